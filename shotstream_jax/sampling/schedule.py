"""Flow-matching schedule of the few-step student (DESIGN 4.4).

The training grid has `num_train_timesteps` points: sigma = shift*s / (1 + (shift-1)*s) for
s in linspace(1, 0, N+1)[:-1], t = N*sigma. The student's denoising steps (e.g. 1000, 740, 500,
260) are *warped* onto that grid: step k becomes grid point N - k, so 740 -> t = 957.93.
The forward process is x_t = (1 - sigma) x0 + sigma eps; the DiT predicts v = eps - x0.
"""

from typing import Sequence, Tuple

import numpy as np


def shifted_grid(num_train_timesteps: int = 1000, shift: float = 8.0) -> np.ndarray:
  """Sigmas of the training grid, descending from 1 (float64)."""
  s = np.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
  return shift * s / (1.0 + (shift - 1.0) * s)


def denoising_sigmas(steps: Sequence[float], num_train_timesteps: int = 1000,
                     shift: float = 8.0, warp: bool = True) -> np.ndarray:
  """Sigmas of the student's steps; `warp` maps step k to grid point N - k (the reference)."""
  steps = np.asarray(steps, np.float64)
  n = num_train_timesteps
  if steps.ndim != 1 or not len(steps) or np.any(steps <= 0) or np.any(steps > n):
    raise ValueError(f'sampling.denoising_steps: need 1+ values in (0, {n}], got {steps.tolist()}')
  if np.any(np.diff(steps) >= 0):
    raise ValueError(f'sampling.denoising_steps: must be strictly decreasing, got {steps.tolist()}')
  if not warp:
    return steps / n
  idx = np.round(n - steps).astype(int)
  if np.any(np.abs(idx - (n - steps)) > 1e-6):
    raise ValueError(f'sampling.denoising_steps: warped steps must be integers, got {steps.tolist()}')
  return shifted_grid(n, shift)[idx]


def sampling_schedule(cfg) -> Tuple[np.ndarray, np.ndarray]:
  """(timesteps, sigmas) float32 arrays of a `sampling` config section."""
  sig = denoising_sigmas(cfg.denoising_steps, cfg.num_train_timesteps, cfg.shift, cfg.warp)
  return (sig * cfg.num_train_timesteps).astype(np.float32), sig.astype(np.float32)


def timestep_sigma(t, num_train_timesteps: int = 1000):
  """sigma of a timestep t in [0, num_train_timesteps] (the DiT's time input is t = N sigma)."""
  return t / num_train_timesteps


def x0_from_velocity(x_t, v, sigma):
  return x_t - sigma * v


def add_noise(x0, noise, sigma):
  return (1.0 - sigma) * x0 + sigma * noise

"""ShotStream model configuration: `get_config('storyworld' | 'tiny' | 'wan_1_3b')`.

Used as `--config=configs/shotstream.py:wan_1_3b --config.model.rope.theta=0` by the entry points
in `launch/`, and imported directly by tests (`from configs import shotstream`).

Presets:
  storyworld  the embedded default: Wan's architectures scaled to train end to end on a 2-core
              CPU on StoryWorld (32x32 video, 11 frames per shot); trained weights ship in
              weights/storyworld/ (launch/reproduce.py makes them from nothing)
  tiny        random-weight shape tests, milliseconds per call
  wan_1_3b    Wan2.1-T2V-1.3B and the published ShotStream

Sections:
  model  the Wan DiT shared by teacher, critic and student (DESIGN 4.1-4.3)
  vae    the Wan2.1 causal 3D VAE (DESIGN 4.6)
  text   the umT5 text encoder (DESIGN 4.6)
  sampling  streaming few-step generation: schedule, shot length, caches, resolution (DESIGN 4.4)
"""

import ml_collections

PRESETS = ('storyworld', 'tiny', 'wan_1_3b')

# Wan2.1 VAE latent normalisation (DESIGN 4.6): latents are (mu - mean) / std.
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def model_config(preset: str) -> ml_collections.ConfigDict:
  """The DiT section. `wan_1_3b` is Wan2.1-T2V-1.3B exactly (1,418,996,800 params)."""
  _check_preset(preset)
  m = ml_collections.ConfigDict()
  if preset == 'wan_1_3b':
    m.dim = 1536
    m.num_layers = 30
    m.num_heads = 12          # head_dim = dim // num_heads = 128
    m.ffn_dim = 8960
    m.freq_dim = 256
    m.text_dim = 4096
    m.text_len = 512
  elif preset == 'storyworld':  # trains on a 2-core CPU (README: StoryWorld default model)
    # 5.1M params (twelfth attempt; 128 / 6 / 2 / 512 before, 1.76M): better on every harness
    # row at 3x the training time (README, "A larger DiT").
    m.dim = 192
    m.num_layers = 8
    m.num_heads = 3           # head_dim 64 -> RoPE pairs 12 / 10 / 10
    m.ffn_dim = 768
    m.freq_dim = 64
    m.text_dim = 64           # = text.d_model
    m.text_len = 32           # StoryWorld prompts are at most 24 tokens (a third of the DiT's cost was padding rows at 64)
  else:  # tiny: runs in milliseconds on CPU
    m.dim = 64
    m.num_layers = 2
    m.num_heads = 2           # head_dim 32 -> RoPE pairs 6 / 5 / 5
    m.ffn_dim = 128
    m.freq_dim = 32
    m.text_dim = 32
    m.text_len = 512         # long story prompts; cheap at this width
  # = vae.z_dim. storyworld: its VAE down-samples 2x to 16x16 latents of 4 channels, so 4x4
  # patches keep Wan's 8x8 pixels per token (16 tokens per latent frame) and a token holds
  # 4x4x4 = 64 values, under the width of 128 (README: StoryWorld default model).
  m.in_channels = 4 if preset == 'storyworld' else 16
  m.out_channels = m.in_channels
  m.patch_size = (1, 4, 4) if preset == 'storyworld' else (1, 2, 2)
  m.eps = 1e-6
  # What the head's output means. Wan predicts the flow velocity v = noise - x0 ('velocity').
  # 'x0' reads it as the clean latents and returns v = (x_t - x0) / max(sigma, x0_min_sigma)
  # (sigma = t / 1000), so every caller still gets a velocity. Why storyworld needs it: a token
  # there is a 4x4x16 = 256-value patch and the width is 128; the clean patches lie on a
  # low-dimensional manifold a 128-wide network can reach, the noise in v does not, and a
  # velocity-predicting model of this shape could not even match the data mean at sigma 1
  # (held-out x0 error 1.12 against a data variance of 0.57 after 1000 image steps).
  m.prediction = 'x0' if preset == 'storyworld' else 'velocity'
  m.x0_min_sigma = 0.05       # 'x0': below this sigma the velocity is damped, not divided by ~0

  # 3D RoPE with the shot discontinuity (DESIGN 4.2). The temporal angle of pair i is
  #   (frame_pos + position_gap * frame_shot) * base**(-2i/d_t) + theta * frame_shot.
  # theta = 1/6 is the reference's phase; position_gap = 0 its (absent) position jump.
  m.rope = ml_collections.ConfigDict()
  m.rope.base = 10000.0
  m.rope.theta = 1.0 / 6.0
  m.rope.position_gap = 0

  # Block-causal structure of the student (DESIGN 4.4): leading clean context frames, then
  # chunks of `chunk_frames` latent frames.
  m.chunk_frames = 3
  m.context_frames = 6

  # Numerics and kernels. Params are always float32 (master weights); `dtype` is the compute.
  m.dtype = 'float32'         # compute dtype: 'float32' | 'bfloat16'
  m.attention = 'xla'         # 'xla' | 'cudnn' (GPU) | 'splash' (TPU): models/attention.py
  m.remat = False             # nn.remat per block (training)
  # Blocks per iteration of the layer scan. 1 everywhere; launch/aot.py sets 2 on a 2-layer
  # copy to measure one block's cost (XLA's cost analysis counts a scanned body once).
  m.scan_unroll = 1
  return m


def vae_config(preset: str) -> ml_collections.ConfigDict:
  """The Wan2.1 causal VAE section (`wan_1_3b` -> the published Wan2.1 VAE)."""
  _check_preset(preset)
  v = ml_collections.ConfigDict()
  v.z_dim = 16
  v.num_res_blocks = 2
  v.temporal_downsample = (False, True, True)
  v.latent_mean = WAN_LATENT_MEAN
  v.latent_std = WAN_LATENT_STD
  if preset == 'wan_1_3b':
    v.base_dim = 96
    v.dim_mult = (1, 2, 4, 4)
  elif preset == 'storyworld':
    # 2x spatial (32x32 -> 16x16 latents) and 2x temporal (11 frames -> 6 latents = 2 chunks
    # of 3). Wan's 8x keeps a 480p protagonist tens of latent pixels wide; at 32x32 a 4x VAE
    # left a wide shot's protagonist under 2 latent pixels and its shape was lost in the round
    # trip (README: StoryWorld default model). Trained by stage 0 (configs/train/vae.py);
    # the latent statistics measured on StoryWorld are folded into its quant convs, so the
    # shipped weights emit normalised latents and the normalisation here is the identity.
    # 4 latent channels: with 16, a 4x4 DiT token held 256 values for a 128-wide network to
    # render sub-token detail through its linear head, and its image samples stayed messy
    # after 5500 steps (README); at 4 the conv decoder does the rendering.
    v.z_dim = 4
    v.base_dim = 8
    v.dim_mult = (1, 2)
    v.num_res_blocks = 1
    v.temporal_downsample = (True,)
    v.latent_mean = (0.0,) * v.z_dim
    v.latent_std = (1.0,) * v.z_dim
  else:
    v.base_dim = 8
    v.dim_mult = (1, 2, 2, 2)
  # The decoder's width where it differs from the encoder's (0: base_dim, Wan's symmetric VAE).
  # Every generated frame goes through the decoder only, so it can be widened (stage 0b, encoder
  # frozen) without touching a latent the DiT stages train on.
  v.decoder_base_dim = 0
  v.image_channels = 3
  v.norm_eps = 1e-12          # RMS norm: x / max(||x||, eps) * sqrt(C) * scale (F.normalize's eps)
  v.dtype = 'float32'         # compute dtype; params stay fp32
  return v


def text_config(preset: str) -> ml_collections.ConfigDict:
  """The umT5 encoder section (`wan_1_3b` -> umT5-XXL)."""
  _check_preset(preset)
  t = ml_collections.ConfigDict()
  if preset == 'wan_1_3b':
    t.vocab_size = 256384
    t.d_model = 4096
    t.num_heads = 64
    t.d_kv = 64
    t.d_ff = 10240
    t.num_layers = 24
  elif preset == 'storyworld':  # frozen random weights, a SentencePiece vocabulary of StoryWorld
    t.vocab_size = 160            # the trained spiece.model's pieces: every StoryWorld word is one
    t.d_model = 64
    t.num_heads = 2
    t.d_kv = 32
    t.d_ff = 128
    t.num_layers = 2
  else:
    t.vocab_size = 512
    t.d_model = 32
    t.num_heads = 2
    t.d_kv = 16
    t.d_ff = 64
    t.num_layers = 2
  t.relative_buckets = 32
  t.relative_max_distance = 128
  t.eps = 1e-6
  t.text_len = model_config(preset).text_len
  t.dtype = 'bfloat16' if preset == 'wan_1_3b' else 'float32'
  return t


def sampling_config(preset: str) -> ml_collections.ConfigDict:
  """Streaming few-step generation (DESIGN 4.4): schedule, shot size, caches, resolution."""
  _check_preset(preset)
  s = ml_collections.ConfigDict()
  s.num_train_timesteps = 1000
  # sigma = shift*s / (1 + (shift-1)*s). The reference's 8 suits 480p (6240 latent pixels a
  # frame, highly redundant). At StoryWorld's 32x32 (measured on the first VAE's 8x8 latents)
  # almost nothing survives sigma 0.7, and with shift 8 the warped student steps sit at sigma
  # 1.0 / 0.96 / 0.89 / 0.74: its last x0 is predicted from sigma 0.74, necessarily a blur.
  # shift 1 puts them at 1.0 / 0.74 / 0.5 / 0.26 and spreads training and the teacher's Euler
  # steps evenly over the noise levels.
  s.shift = 1.0 if preset == 'storyworld' else 8.0
  s.denoising_steps = (1000, 740, 500, 260)
  s.warp = True                 # map step k onto grid point 1000 - k (the reference)
  s.cache_timestep = 0.0        # timestep of the clean pass that writes a chunk's K/V
  if preset == 'wan_1_3b':
    s.height, s.width = 480, 832  # pixels -> latent 60x104 -> 1560 tokens per latent frame
    s.shot_latent_frames = 21     # 81 pixel frames per shot = 7 chunks of 3
  elif preset == 'storyworld':
    s.height, s.width = 32, 32    # latent 16x16 -> 16 tokens per latent frame (4x4 patches)
    s.shot_latent_frames = 6      # 11 pixel frames per shot = 2 chunks of 3
  else:
    s.height, s.width = 64, 96    # latent 8x12 -> 24 tokens per latent frame
    s.shot_latent_frames = 6      # 21 pixel frames per shot = 2 chunks of 3
  s.local_frames = s.shot_latent_frames  # local cache capacity (latent frames)
  # How a chunk attends to the local cache: 'filled' only its filled chunks (cost grows with
  # the fill; a lax.switch over fills); 'masked' the whole capacity under a validity mask (the
  # same numbers at the full-capacity cost; kept to measure the difference).
  s.local_attention = 'filled'
  s.context = 'history'         # global context: 'history' (reference) | 'none' (ablation)
  s.fps = 16
  return s


def get_config(arg: str = 'storyworld') -> ml_collections.ConfigDict:
  """Full config for a preset name (`storyworld`, `tiny` or `wan_1_3b`)."""
  preset = (arg or 'storyworld').strip()
  _check_preset(preset)
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.model = model_config(preset)
  c.vae = vae_config(preset)
  c.text = text_config(preset)
  c.sampling = sampling_config(preset)
  # Seed of the embedded random weights (DiT, VAE, umT5) wherever no file is given: random
  # generation, --ckpt alone at `tiny`, and the encoders StoryWorld training encodes with.
  c.seed = 0
  # Trained weights shipped with the repository for this preset ('' = none: random weights);
  # relative to the repository root (shotstream_jax/embedded.py).
  c.weights_dir = 'weights/storyworld' if preset == 'storyworld' else ''
  return c


def _check_preset(preset: str) -> None:
  if preset not in PRESETS:
    raise ValueError(f'config preset: unknown preset {preset!r}; accepted: {", ".join(PRESETS)}')

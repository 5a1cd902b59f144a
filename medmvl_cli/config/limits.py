"""Default limits on untrusted input (the recipe's `data.max_voxels` / `data.max_pixels`, the
commands' `--max-voxels` / `--max-pixels`); `medmvl_cli/data/limits.py` enforces them."""

DEFAULT_MAX_VOXELS = 512 * 512 * 2048  # more than the largest real CTs
DEFAULT_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS (about 9,459²), written out so no PIL import

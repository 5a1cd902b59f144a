"""Moving models in and out of medmvl.

- `export_native.export_medmvl(model_dir, out, merge_lora=...)`: a self-contained medmvl model
  folder (`medmvl export --format medmvl`), a LoRA adapter kept or merged.
- `export_hf.export_hf_llava(model_dir, out, transformers4=...)`: transformers'
  `LlavaForConditionalGeneration` + `LlavaProcessor` folder (`--format hf-llava`), for 5.x or, with
  `llava_transformers4.py`, for 4.x.
- `medm_vl/`: MedM-VL's checkpoint format (`medmvl import medm-vl`): `medm_vl/importer.py`
  (`import_medm_vl(src, out, ...)`: a MedM-VL folder -> a medmvl run folder), `medm_vl/checkpoint.py`
  reads MedM-VL's config and weights, `medm_vl/mapping.py` maps them onto medmvl's.
- `staging.py`: outputs are built beside their final place and renamed into it.

See docs/interop.md.
"""

from __future__ import annotations

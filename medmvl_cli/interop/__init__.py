"""Moving models in and out of medmvl.

- `export_medmvl.export_medmvl(model_dir, out, merge_lora=...)`: a self-contained medmvl model
  folder (`medmvl export --format medmvl`), a LoRA adapter kept or merged.
- `export_hf.export_hf_llava(model_dir, out, transformers4=...)`: transformers'
  `LlavaForConditionalGeneration` + `LlavaProcessor` folder (`--format hf-llava`), for 5.x or, with
  `hf_transformers4.py`, for 4.x.
- `import_medmvl.import_medm_vl(src, out, ...)`: a MedM-VL checkpoint folder -> a medmvl run folder
  (`medmvl import medm-vl`); `medmvl_checkpoint.py` reads MedM-VL's config and weights,
  `medmvl_mapping.py` maps its settings and weight names onto medmvl's.
- `staging.py`: outputs are built beside their final place and renamed into it.

See docs/interop.md.
"""

from __future__ import annotations

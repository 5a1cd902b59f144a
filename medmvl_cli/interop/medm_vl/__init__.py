"""MedM-VL's checkpoint format (the project medmvl grew from), read and mapped onto medmvl's.

- `checkpoint.py`: reads a MedM-VL checkpoint folder's config and weights.
- `mapping.py`: maps its settings and weight names onto medmvl's.
- `importer.py`: `import_medm_vl(src, out, ...)`, a MedM-VL folder -> a medmvl run folder
  (`medmvl import medm-vl`).
"""

"""The names a recipe may use for chat templates and built-in LLM presets, listed once.

The schema's choices come from here; the registries that implement them (`data/templates.py`,
`model/presets/models.py`, `model/presets/tokenizer_files.py`) sit on higher floors and are checked
against these lists by their tests, so a name cannot be added to one side only.
"""

from __future__ import annotations

# The LLM families with a preset tokenizer, each with its native chat template of the same name.
NATIVE_TEMPLATES: tuple[str, ...] = ("qwen2", "llama3", "phi", "phi3")
# The native templates, `plain` (pretraining captions) and MedM-VL's prompt layout per family.
TEMPLATES: tuple[str, ...] = NATIVE_TEMPLATES + ("plain",) + tuple(f"medmvl-{f}" for f in NATIVE_TEMPLATES)
# Built-in tiny random-init LLMs -> the native template of their family.
PRESET_TEMPLATES: dict[str, str] = {"tiny-qwen2": "qwen2", "tiny-llama": "llama3", "tiny-phi": "phi", "tiny-phi3": "phi3"}
LLM_PRESETS: tuple[str, ...] = tuple(PRESET_TEMPLATES)

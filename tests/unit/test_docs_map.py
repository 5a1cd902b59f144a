"""docs/model.md's "Where things live" map names only paths that exist."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_every_path_in_the_map_exists():
    text = (REPO / "docs" / "model.md").read_text(encoding="utf-8")
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"`((?:medmvl_cli|tools|recipes)/[^`]*)`", section))
    assert len(paths) >= 15, paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/model.md names paths that do not exist: {missing}"
    # The short names inside the table rows exist under their folder too.
    for folder, names in (("medmvl_cli/interop", ["export_native.py", "export_hf.py", "llava_transformers4.py"]),
                          ("medmvl_cli/interop/medm_vl", ["checkpoint.py", "mapping.py", "importer.py"]),
                          ("medmvl_cli/runs", ["folder.py", "checkpoint.py", "resolve.py"]),
                          ("medmvl_cli/config", ["schema.py", "loader.py", "resolve.py", "problems.py", "names.py"]),
                          ("medmvl_cli/model/encoders", ["clip.py", "siglip.py", "vit3d.py", "m3d_clip.py", "medm_clip.py",
                                                         "slices.py", "monai_vit3d_module.py", "volume_vit_base.py",
                                                         "released_weights.py"])):
        for name in names:
            assert name in section and (REPO / folder / name).is_file(), f"{folder}/{name}"

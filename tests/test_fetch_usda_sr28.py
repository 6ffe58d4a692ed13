"""tools/fetch_usda_sr28.py's comparison of a download with the SR28 copy the repository carries."""

from __future__ import annotations

import sys
from pathlib import Path

from nutrition import BUNDLED_SR28, unpack_sr28

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from fetch_usda_sr28 import differences


def test_usdas_files_as_the_bundle_holds_them_show_no_difference(tmp_path: Path) -> None:
    assert differences(unpack_sr28(BUNDLED_SR28, tmp_path / "usda")) == []


def test_a_changed_and_a_missing_file_are_each_named(tmp_path: Path) -> None:
    folder = unpack_sr28(BUNDLED_SR28, tmp_path / "usda")
    weights = folder / "WEIGHT.txt"
    weights.write_bytes(weights.read_bytes().replace(b"cup", b"mug", 1))
    (folder / "NUTR_DEF.txt").unlink()

    found = differences(folder)

    assert [line.split(":")[0] for line in found] == ["NUTR_DEF.txt", "WEIGHT.txt"]
    assert found[0].startswith("NUTR_DEF.txt: missing, the bundled copy has ")

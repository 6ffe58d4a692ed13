"""Download USDA's SR28 ASCII files into data/usda-sr28/ and check them against usda-sr28/.

    python tools/fetch_usda_sr28.py [--dest data/usda-sr28] [--timeout 60]

Fetches sr28asc.zip (FOOD_DES, FD_GROUP, NUTR_DEF, WEIGHT) and sr28abbr.zip (ABBREV) from the
USDA Nutrient Data Laboratory, unpacks the five files the service reads, writes ABBREV.columns,
checks the result loads, and compares each file's SHA-256 with the copy the repository carries
(usda-sr28/SHA256SUMS): the way to re-derive the bundled table from USDA's own download. Exits 1
with one line when USDA cannot be reached (the service keeps counting from its bundled copy), and
when a downloaded file differs from the bundled one (naming it; the download stays in --dest,
for USDA_SR28_DIR).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nutrition import BUNDLED_SR28, NutritionDataError, NutritionTable  # noqa: E402

# The Nutrient Data Laboratory's SR28 download folder has moved with USDA reorganisations; the
# same zips are served at each of these, newest first.
DOWNLOAD_FOLDERS = (
    "https://www.ars.usda.gov/ARSUserFiles/80400535/DATA/SR/sr28/dnload/",
    "https://www.ars.usda.gov/ARSUserFiles/80400525/Data/SR/SR28/dnload/",
    "https://www.ars.usda.gov/SP2UserFiles/Place/12354500/Data/SR/SR28/dnload/",
)
ARCHIVES = {
    "sr28asc.zip": ("FOOD_DES.txt", "FD_GROUP.txt", "NUTR_DEF.txt", "WEIGHT.txt"),
    "sr28abbr.zip": ("ABBREV.txt",),
}
# ABBREV.txt has no header line; these are its columns in order, as in USDA's abbreviated file
# (sr28abbr's spreadsheet header and sr28_doc.pdf), spelled as USDA spells them.
ABBREV_COLUMNS = (
    "NDB_No",
    "Shrt_Desc",
    "Water_(g)",
    "Energ_Kcal",
    "Protein_(g)",
    "Lipid_Tot_(g)",
    "Ash_(g)",
    "Carbohydrt_(g)",
    "Fiber_TD_(g)",
    "Sugar_Tot_(g)",
    "Calcium_(mg)",
    "Iron_(mg)",
    "Magnesium_(mg)",
    "Phosphorus_(mg)",
    "Potassium_(mg)",
    "Sodium_(mg)",
    "Zinc_(mg)",
    "Copper_mg)",
    "Manganese_(mg)",
    "Selenium_(µg)",
    "Vit_C_(mg)",
    "Thiamin_(mg)",
    "Riboflavin_(mg)",
    "Niacin_(mg)",
    "Panto_Acid_mg)",
    "Vit_B6_(mg)",
    "Folate_Tot_(µg)",
    "Folic_Acid_(µg)",
    "Food_Folate_(µg)",
    "Folate_DFE_(µg)",
    "Choline_Tot_ (mg)",
    "Vit_B12_(µg)",
    "Vit_A_IU",
    "Vit_A_RAE",
    "Retinol_(µg)",
    "Alpha_Carot_(µg)",
    "Beta_Carot_(µg)",
    "Beta_Crypt_(µg)",
    "Lycopene_(µg)",
    "Lut+Zea_ (µg)",
    "Vit_E_(mg)",
    "Vit_D_µg",
    "Vit_D_IU",
    "Vit_K_(µg)",
    "FA_Sat_(g)",
    "FA_Mono_(g)",
    "FA_Poly_(g)",
    "Cholestrl_(mg)",
    "GmWt_1",
    "GmWt_Desc1",
    "GmWt_2",
    "GmWt_Desc2",
    "Refuse_Pct",
)


class DownloadError(Exception):
    """USDA could not be reached or sent something that is not the SR28 archive."""


def fetch(name: str, timeout: float) -> bytes:
    """The bytes of one SR28 archive, from the first USDA folder that serves it."""
    reasons: list[str] = []
    for folder in DOWNLOAD_FOLDERS:
        try:
            with urllib.request.urlopen(folder + name, timeout=timeout) as response:
                return bytes(response.read())
        except (urllib.error.URLError, OSError) as error:
            reason = str(getattr(error, "reason", error))
            if reason not in reasons:
                reasons.append(reason)
    raise DownloadError(f"{name} from www.ars.usda.gov: {'; '.join(reasons)}")


def unpack(archive: bytes, wanted: tuple[str, ...], into: Path) -> None:
    """Write the wanted members of a zip into a folder, whatever case USDA gave their names."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            members = {Path(info.filename).name.lower(): info for info in opened.infolist()}
            for name in wanted:
                info = members.get(name.lower())
                if info is None:
                    raise DownloadError(f"the archive has no {name}")
                (into / name).write_bytes(opened.read(info))
    except zipfile.BadZipFile as error:
        raise DownloadError(f"not a zip archive ({error})") from None


def differences(folder: Path, bundle: Path = BUNDLED_SR28) -> list[str]:
    """The files of ``folder`` whose SHA-256 is not the bundled copy's, each with both digests."""
    found = []
    for line in (bundle / "SHA256SUMS").read_text(encoding="ascii").splitlines():
        expected, name = line.split()
        path = folder / name
        actual = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"
        if actual != expected:
            found.append(f"{name}: {actual[:16]}, the bundled copy has {expected[:16]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "data" / "usda-sr28")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    arguments = parser.parse_args(argv)
    destination: Path = arguments.dest
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".usda-sr28-") as staging:
        staged = Path(staging) / destination.name
        staged.mkdir()
        try:
            for archive, members in ARCHIVES.items():
                unpack(fetch(archive, arguments.timeout), members, staged)
        except DownloadError as error:
            print(
                f"cannot download USDA SR28 ({error}): the service counts from the copy it "
                "carries (usda-sr28/)",
                file=sys.stderr,
            )
            return 1
        columns = staged / "ABBREV.columns"
        if not columns.exists():
            columns.write_text("\n".join(ABBREV_COLUMNS) + "\n", encoding="utf-8")
        try:
            table = NutritionTable.load(staged)
        except NutritionDataError as error:
            print(f"downloaded SR28 does not load: {error}", file=sys.stderr)
            return 1
        if destination.exists():
            shutil.rmtree(destination)
        staged.rename(destination)
    changed = differences(destination)
    if changed:
        print(
            f"{table.label} in {destination} differs from the bundled usda-sr28/: "
            + "; ".join(changed),
            file=sys.stderr,
        )
        return 1
    print(
        f"{table.label} in {destination}, file for file the bundled usda-sr28/ "
        f"({table.identity}); USDA_SR28_DIR={destination} counts from this copy"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

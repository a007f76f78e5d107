"""Put MovieLens 100K under the data folder, never into git (its licence forbids redistribution).

    python scripts/fetch_movielens.py                      # data/ml-100k, from the RecBole 1.2.1 wheel
    python scripts/fetch_movielens.py --dest ~/data/ml-100k
    python scripts/fetch_movielens.py --wheel recbole-1.2.1-py3-none-any.whl   # a wheel already on disk
    python scripts/fetch_movielens.py --source grouplens   # ml-100k.zip from grouplens.org (needs the internet)

Why the wheel: RecBole 1.2.1 ships MovieLens 100K in its atomic format (`ml-100k.inter`, `.item`, `.user`), and a
package registry is reachable where the internet is not. `pip download --no-deps recbole==1.2.1` fetches the wheel
(a zip) and the three files are read out of it; nothing is installed. Each written file is checked against the
SHA-256 recorded here, so a changed wheel or a truncated download fails loudly. Then
`python train.py experiment=mf_movielens data.path=data/ml-100k` reads them (zoo/data/recommender.py).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

RECBOLE = "recbole==1.2.1"
WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"
# SHA-256 of the files as RecBole 1.2.1 ships them
ATOMIC_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# SHA-256 of the 100,000 ratings as sorted "user\titem\trating\ttimestamp\n" lines: the same for GroupLens' u.data
# and RecBole's ml-100k.inter, whatever the order or header of the file
RATINGS_SHA256 = "6cfffb52c89b05fbc3afb75f6912eeda04c81c2add0dc58e773a0ef6c8adb160"


class FetchError(RuntimeError):
    """A download or a check that failed: one line for the user."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_atomic(wheel: Path, dest: Path, expected: dict[str, str] = ATOMIC_SHA256) -> list[Path]:
    """Copy the `expected` files out of the wheel's dataset_example/ml-100k into dest and check their SHA-256.

    A file whose digest differs is removed again, so that dest never holds data that passed for the real thing.
    """
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as error:
        raise FetchError(f"'{wheel}' is not a readable wheel ({error})") from error
    with archive:
        names = set(archive.namelist())
        for name, digest in expected.items():
            member = WHEEL_FOLDER + name
            if member not in names:
                raise FetchError(f"'{wheel}' has no {member}; expected the {RECBOLE} wheel")
            target = dest / name
            partial = target.with_suffix(target.suffix + ".part")
            with archive.open(member) as source, partial.open("wb") as sink:
                while block := source.read(1 << 20):
                    sink.write(block)
            found = sha256(partial)
            if found != digest:
                partial.unlink()
                raise FetchError(f"{name} from '{wheel}': SHA-256 {found}, expected {digest}")
            partial.replace(target)
            written.append(target)
    return written


def download_wheel(folder: Path) -> Path:
    """`pip download --no-deps recbole==1.2.1` into folder: the wheel file."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("recbole-1.2.1-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip download {RECBOLE} failed: {tail[0]}")
    return wheels[0]


def from_grouplens(dest: Path) -> list[Path]:
    """ml-100k.zip from GroupLens, unpacked into dest (u.data, u.item, u.user, u1..u5.base/test)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "ml-100k.zip"
        try:
            urllib.request.urlretrieve(GROUPLENS_URL, archive)
        except OSError as error:
            raise FetchError(f"cannot download {GROUPLENS_URL} ({error}); try --source recbole") from error
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                name = Path(member).name
                if member.endswith("/") or not name:
                    continue
                target = dest / name
                target.write_bytes(zipped.read(member))
                written.append(target)
    found = ratings_sha256(dest / "u.data")
    if found != RATINGS_SHA256:
        raise FetchError(f"u.data from {GROUPLENS_URL}: ratings SHA-256 {found}, expected {RATINGS_SHA256}")
    return written


def ratings_sha256(path: Path, header: bool = False) -> str:
    """The SHA-256 of a ratings file's rows, sorted and written one way, so that two formats of the same data agree."""
    lines = path.read_text(encoding="utf-8").splitlines()[1 if header else 0 :]
    rows = sorted(tuple(int(float(v)) for v in line.split("\t")[:4]) for line in lines if line.strip())
    return hashlib.sha256("".join("\t".join(map(str, row)) + "\n" for row in rows).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path("data/ml-100k"), help="the folder to write (data/ml-100k)")
    parser.add_argument("--source", choices=("recbole", "grouplens"), default="recbole")
    parser.add_argument("--wheel", type=Path, default=None, help="a recbole 1.2.1 wheel already downloaded")
    args = parser.parse_args(argv)
    dest = args.dest.expanduser()
    try:
        if args.source == "grouplens":
            written = from_grouplens(dest)
        elif args.wheel is not None:
            written = extract_atomic(args.wheel.expanduser(), dest)
        else:
            with tempfile.TemporaryDirectory(prefix="recbole_") as tmp:
                written = extract_atomic(download_wheel(Path(tmp)), dest)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MovieLens 100K: {len(written)} files in {dest} (checked); train with data.path={dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

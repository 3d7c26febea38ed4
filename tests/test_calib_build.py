"""`spa calib` (spa.calib_build): calibration .npz files from images or text, no code."""
import argparse
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from spa import calib_build
from spa.activations import load_calibration
from spa.errors import SpaError

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("tokenizers")


# ------------------------------------------------------------------------------------------
# models


def _save(tmp_path, name, inputs, nodes, outputs, inits=()):
    g = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(m, path)
    return path


def _image_model(tmp_path, name="cnn", shape=(1, 3, 32, 32), elem=TensorProto.FLOAT,
                 input_name="pixel_values", extra=()):
    x = helper.make_tensor_value_info(input_name, elem, list(shape))
    y = helper.make_tensor_value_info("y", elem, None)
    node = helper.make_node("ReduceMean", [input_name], ["y"], keepdims=0)
    return _save(tmp_path, name, [x, *extra], [node], [y])


def _bert_model(tmp_path, name="bert", seq=16, elem=TensorProto.INT64, names=None, extra=()):
    names = names or ["input_ids", "attention_mask", "token_type_ids"]
    ins = [helper.make_tensor_value_info(n, elem, ["batch", seq]) for n in names]
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [64, 4],
                             np.random.default_rng(0).normal(size=256).astype(np.float32))
    nodes = [helper.make_node("Gather", ["emb", names[0]], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _save(tmp_path, name, ins + list(extra), nodes, [y], [emb])


# ------------------------------------------------------------------------------------------
# data


def _images(folder, specs):
    """specs: (relative path, size (w, h), mode, fill) -> written image files."""
    for rel, size, mode, fill in specs:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, fill).save(p)
    return folder


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    return _images(d, [
        ("cat/a.png", (40, 32), "RGB", (255, 0, 128)),
        ("cat/b.jpg", (64, 48), "RGB", (10, 200, 30)),
        ("dog/c.png", (32, 32), "L", 77),
        ("dog/d.png", (100, 50), "RGBA", (1, 2, 3, 255)),
        ("dog/sub/e.jpeg", (33, 70), "RGB", (90, 90, 90)),
        ("fox/f.png", (32, 40), "RGB", (0, 0, 0)),
    ])


LINES = ["the cat sat on the mat", "", "a dog ran in the park today",
         "hello world this is a test of the tokenizer with a rather long line indeed and more",
         "   ", "cats and dogs", "the park is green", "one more line"]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([s for s in LINES if s.strip()], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


# ------------------------------------------------------------------------------------------
# the CLI through run() (spa/cli.py registers it; here a parser of our own)


def cli(argv):
    p = argparse.ArgumentParser(prog="spa")
    calib_build.add_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(["calib", *map(str, argv)])
    try:
        return args.fn(args)
    except SpaError as exc:
        print(f"spa: error: {exc.describe()}")  # noqa
        return exc.exit_code


def _load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------
# images


def test_images_nchw_all_sorted_with_labels(tmp_path, image_dir, capsys):
    model = _image_model(tmp_path)
    out = tmp_path / "calib.npz"
    assert cli([model, "-o", out, "--images", image_dir, "--labels"]) == 0
    d = _load(out)
    assert list(d) == ["pixel_values", "labels"]
    x = d["pixel_values"]
    assert x.shape == (6, 3, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # sorted by path: cat/a, cat/b, dog/c, dog/d, dog/sub/e, fox/f
    assert d["labels"].tolist() == [0, 0, 1, 1, 1, 2] and d["labels"].dtype == np.int64
    np.testing.assert_allclose(x[0, :, 5, 5], [1.0, 0.0, 128 / 255], atol=1e-6)
    np.testing.assert_allclose(x[2], 77 / 255, atol=1e-6)        # L -> RGB: gray copies
    np.testing.assert_allclose(x[3, :, 10, 10], [1 / 255, 2 / 255, 3 / 255], atol=1e-6)
    assert np.all(x[5] == 0)
    assert "0=cat, 1=dog, 2=fox" in capsys.readouterr().out
    calib = load_calibration(str(out), onnx.load(model))
    assert calib.n_samples == 6 and calib.labels.tolist() == [0, 0, 1, 1, 1, 2]


def test_mean_std_and_dtype_float16(tmp_path):
    d = _images(tmp_path / "one", [("x.png", (32, 32), "RGB", (255, 0, 128))])
    model = _image_model(tmp_path, elem=TensorProto.FLOAT16)
    arrays = calib_build.build_images(model, d, mean="0.5,0.5,0.5", std=[0.5, 0.25, 1.0])
    x = arrays["pixel_values"]
    assert x.dtype == np.float16 and x.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(x[0, :, 3, 7].astype(np.float64),
                               [1.0, -2.0, 128 / 255 - 0.5], atol=2e-3)
    one = calib_build.build_images(model, d, mean="0.5", std="0.5")["pixel_values"]
    np.testing.assert_allclose(one[0, :, 0, 0].astype(np.float64),
                               [1.0, -1.0, (128 / 255 - 0.5) / 0.5], atol=2e-3)


def _column_image(path, w, h):
    """Pixel (row r, column c) = (c, r, 200): the crop position can be read off."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    a[..., 2] = 200
    Image.fromarray(a, "RGB").save(path)


def test_center_crop_exact(tmp_path):
    d = tmp_path / "crop"
    d.mkdir()
    _column_image(d / "wide.png", 48, 32)     # shorter side = 32: no resize, crop columns
    _column_image(d / "tall.png", 32, 44)     # crop rows 6..37
    model = _image_model(tmp_path, name="nhwc", shape=("N", 32, 32, 3))
    x = calib_build.build_images(model, d)["pixel_values"]
    assert x.shape == (2, 32, 32, 3)          # NHWC inferred from the model
    tall, wide = np.rint(x * 255).astype(int)  # sorted: tall.png, wide.png
    assert wide[0, :, 0].tolist() == list(range(8, 40))
    assert wide[:, 0, 1].tolist() == list(range(32))
    assert tall[0, :, 0].tolist() == list(range(32))
    assert tall[:, 0, 1].tolist() == list(range(6, 38))
    assert np.all(tall[..., 2] == 200)
    assert load_calibration(_write(tmp_path, {"pixel_values": x}), onnx.load(model)) \
        .n_samples == 2


def test_resize_then_crop(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    Image.new("RGB", (128, 64), (50, 100, 150)).save(d / "x.png")
    model = _image_model(tmp_path, shape=(1, 3, 16, 24))
    x = calib_build.build_images(model, d)["pixel_values"]
    assert x.shape == (1, 3, 16, 24)
    np.testing.assert_allclose(x[0, :, 8, 12], [50 / 255, 100 / 255, 150 / 255], atol=1e-6)
    x2 = calib_build.build_images(model, d, resize=40)["pixel_values"]
    assert x2.shape == (1, 3, 16, 24)


def test_grayscale_model(tmp_path, image_dir):
    model = _image_model(tmp_path, name="gray", shape=("N", 1, 28, 28))
    x = calib_build.build_images(model, image_dir, mean="0.5", std="0.5")["pixel_values"]
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    gray = round(0.299 * 255 + 0.587 * 0 + 0.114 * 128)  # Pillow's L of (255, 0, 128)
    assert abs((x[0, 0, 3, 3] * 0.5 + 0.5) * 255 - gray) <= 1
    assert abs((x[2, 0, 0, 0] * 0.5 + 0.5) * 255 - 77) < 1e-3
    assert load_calibration(_write(tmp_path, {"pixel_values": x}), onnx.load(model)) \
        .n_samples == 6


def test_uint8_model_raw_pixels(tmp_path, image_dir):
    model = _image_model(tmp_path, name="u8", shape=(1, 32, 32, 3), elem=TensorProto.UINT8)
    x = calib_build.build_images(model, image_dir)["pixel_values"]
    assert x.dtype == np.uint8 and x.shape == (6, 32, 32, 3)
    assert x[0, 4, 4].tolist() == [255, 0, 128]
    assert cli([model, "-o", tmp_path / "u.npz", "--images", image_dir, "--mean", "0.5"]) == 2
    assert not (tmp_path / "u.npz").exists()


def test_seeded_sample(tmp_path, image_dir):
    model = _image_model(tmp_path)
    a = calib_build.build_images(model, image_dir, count=3, seed=0, labels=True)
    b = calib_build.build_images(model, image_dir, count=3, seed=0, labels=True)
    c = calib_build.build_images(model, image_dir, count=3, seed=1, labels=True)
    assert a["pixel_values"].shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])
    assert cli([model, "-o", tmp_path / "x.npz", "--images", image_dir, "--count", 7]) == 2
    assert not (tmp_path / "x.npz").exists()


def test_byte_identical_rerun_and_atomic(tmp_path, image_dir):
    model = _image_model(tmp_path)
    outs = [tmp_path / "r1.npz", tmp_path / "r2.npz"]
    for o in outs:
        assert cli([model, "-o", o, "--images", image_dir, "--count", 4, "--seed", 3,
                    "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".spa-")]  # no temp left
    assert cli([model, "-o", outs[0], "--images", image_dir, "--count", 4]) == 0  # replaces
    assert outs[0].read_bytes() != outs[1].read_bytes()


def test_image_errors_write_nothing(tmp_path, image_dir, capsys):
    out = tmp_path / "bad.npz"
    rank3 = _image_model(tmp_path, name="r3", shape=(1, 32, 32))
    assert cli([rank3, "-o", out, "--images", image_dir]) == 3
    assert "model input 'pixel_values' has 3 axes" in capsys.readouterr().out
    scalar = helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])
    two = _image_model(tmp_path, name="two", extra=[scalar])
    assert cli([two, "-o", out, "--images", image_dir]) == 3
    msg = capsys.readouterr().out
    assert "'temperature'" in msg and "two.onnx" in msg
    ambiguous = _image_model(tmp_path, name="amb", shape=(1, 3, 3, 3))
    assert cli([ambiguous, "-o", out, "--images", image_dir]) == 2
    assert "--layout" in capsys.readouterr().out
    assert cli([ambiguous, "-o", out, "--images", image_dir, "--layout", "nhwc"]) == 0
    out.unlink()
    dyn = _image_model(tmp_path, name="dyn", shape=("N", 3, "H", "W"))
    assert cli([dyn, "-o", out, "--images", image_dir]) == 2
    assert "--size" in capsys.readouterr().out
    ints = _image_model(tmp_path, name="ints", elem=TensorProto.INT64)
    assert cli([ints, "-o", out, "--images", image_dir]) == 3
    model = _image_model(tmp_path)
    assert cli([model, "-o", out, "--images", tmp_path / "nowhere"]) == 2
    assert cli([model, "-o", out, "--images", image_dir, "--mean", "123.675,116.28,103.53"]) == 2
    assert cli([model, "-o", out, "--images", image_dir, "--mean", "0.1,0.2"]) == 2
    assert cli([model, "-o", out, "--images", image_dir, "--seq-len", 8]) == 2
    assert cli([model, "-o", tmp_path / "no" / "x.npz", "--images", image_dir]) == 2
    assert cli([model, "-o", model, "--images", image_dir]) == 2       # never the input
    (image_dir / "broken.png").write_bytes(b"not a png")
    assert cli([model, "-o", out, "--images", image_dir]) == 3
    assert "broken.png" in capsys.readouterr().out
    assert not out.exists()
    assert os.path.getsize(model) > 0 and onnx.load(model).graph.input[0].name == "pixel_values"


def test_dynamic_size_given(tmp_path, image_dir):
    dyn = _image_model(tmp_path, name="dyn", shape=("N", 3, "H", "W"))
    x = calib_build.build_images(dyn, image_dir, size="20x24")["pixel_values"]
    assert x.shape == (6, 3, 20, 24)
    calib = load_calibration(_write(tmp_path, {"pixel_values": x}), onnx.load(dyn))
    assert calib.n_samples == 6


def _write(tmp_path, arrays):
    p = tmp_path / "w.npz"
    calib_build.write_npz(p, arrays)
    return str(p)


# ------------------------------------------------------------------------------------------
# text


def test_text_bert_inputs(tmp_path, text_file, tokenizer_json):
    model = _bert_model(tmp_path)
    out = tmp_path / "text.npz"
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer",
                tokenizer_json.parent]) == 0
    d = _load(out)
    assert list(d) == ["input_ids", "attention_mask", "token_type_ids"]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    lines = [s.strip() for s in LINES if s.strip()]
    assert d["input_ids"].shape == (len(lines), 16)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert d[k].dtype == np.int64
    assert len(tok.encode(lines[2]).ids) > 16
    tok.enable_truncation(max_length=16)
    for row, line in enumerate(lines):
        ids = tok.encode(line).ids
        n = len(ids)
        assert d["attention_mask"][row].tolist() == [1] * n + [0] * (16 - n)
        assert d["input_ids"][row, :n].tolist() == ids
        assert np.all(d["input_ids"][row, n:] == 0)                  # [PAD] = 0
        assert d["input_ids"][row, 0] == 2 and d["input_ids"][row, n - 1] == 3
    assert d["attention_mask"][2].sum() == 16                        # the long line: truncated
    assert not d["token_type_ids"].any()
    calib = load_calibration(str(out), onnx.load(model))
    assert calib.n_samples == len(lines) and calib.row_mask is not None
    assert cli([model, "-o", tmp_path / "again.npz", "--text", text_file, "--tokenizer",
                tokenizer_json]) == 0
    assert (tmp_path / "again.npz").read_bytes() == out.read_bytes()


def test_text_int32_dynamic_seq_len_and_sample(tmp_path, text_file, tokenizer_json):
    model = _bert_model(tmp_path, name="dyn", seq="seq", elem=TensorProto.INT32,
                        names=["ids", "mask"])
    out = tmp_path / "t.npz"
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer", tokenizer_json]) == 2
    assert not out.exists()
    a = calib_build.build_text(model, text_file, tokenizer_json, seq_len=8, count=4, seed=5)
    b = calib_build.build_text(model, text_file, tokenizer_json, seq_len=8, count=4, seed=5)
    c = calib_build.build_text(model, text_file, tokenizer_json, seq_len=8, count=4, seed=6)
    assert a["ids"].shape == (4, 8) and a["ids"].dtype == np.int32
    assert a["mask"].dtype == np.int32
    np.testing.assert_array_equal(a["ids"], b["ids"])
    assert not np.array_equal(a["ids"], c["ids"])
    assert calib_build.build_text(model, text_file, tokenizer_json, seq_len=8)["ids"].shape \
        == (6, 8)


def test_text_pack(tmp_path, text_file, tokenizer_json):
    model = _bert_model(tmp_path, seq=6)
    d = calib_build.build_text(model, text_file, tokenizer_json, pack=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    stream = [i for s in LINES if s.strip() for i in tok.encode(s.strip(),
                                                              add_special_tokens=False).ids]
    n = len(stream) // 4
    assert d["input_ids"].shape == (n, 6) and d["attention_mask"].all()
    assert d["input_ids"][:, 0].tolist() == [2] * n and d["input_ids"][:, 5].tolist() == [3] * n
    assert d["input_ids"][:, 1:5].ravel().tolist() == stream[:4 * n]


def test_bert_vocab_txt(tmp_path, text_file):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
             "dog", "park", "##s"]
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = _bert_model(tmp_path)
    x = calib_build.build_text(model, text_file, d)
    assert x["input_ids"][0, :8].tolist() == [2, 5, 6, 7, 8, 5, 9, 3]   # the cat sat on ...
    assert x["input_ids"][3, :8].tolist() == [2, 6, 12, 1, 10, 12, 3, 0]  # cats and dogs
    assert x["attention_mask"][3].sum() == 7


def test_text_errors_write_nothing(tmp_path, text_file, tokenizer_json, capsys):
    out = tmp_path / "bad.npz"
    model = _bert_model(tmp_path)
    assert cli([model, "-o", out, "--text", text_file]) == 2                # no tokenizer
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer",
                tmp_path / "missing.json"]) == 2
    assert "missing.json" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("{not json")
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer",
                tmp_path / "junk.json"]) == 3
    assert cli([model, "-o", out, "--text", tmp_path / "none.txt", "--tokenizer",
                tokenizer_json]) == 2
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer", tokenizer_json,
                "--seq-len", 32]) == 2                                       # model says 16
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer", tokenizer_json,
                "--mean", "0.5"]) == 2
    rank3 = _save(tmp_path, "r3", [helper.make_tensor_value_info(
        "input_ids", TensorProto.INT64, [1, 16, 2])],
        [helper.make_node("Identity", ["input_ids"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    assert cli([rank3, "-o", out, "--text", text_file, "--tokenizer", tokenizer_json]) == 3
    assert "model input 'input_ids' has 3 axes" in capsys.readouterr().out
    pixel = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 8, 8])
    extra = _bert_model(tmp_path, name="extra", extra=[pixel])
    assert cli([extra, "-o", out, "--text", text_file, "--tokenizer", tokenizer_json]) == 3
    assert "'pixel_values'" in capsys.readouterr().out
    from tokenizers import Tokenizer, models, pre_tokenizers
    strict = Tokenizer(models.WordLevel({"the": 0, "cat": 1}))   # no unknown token
    strict.pre_tokenizer = pre_tokenizers.Whitespace()
    strict.save(str(tmp_path / "strict.json"))
    assert cli([model, "-o", out, "--text", text_file, "--tokenizer",
                tmp_path / "strict.json"]) == 3
    assert "line 1" in capsys.readouterr().out
    assert not out.exists()


def test_images_into_text_model_and_back(tmp_path, image_dir, text_file, tokenizer_json):
    out = tmp_path / "bad.npz"
    bert = _bert_model(tmp_path)
    assert cli([bert, "-o", out, "--images", image_dir]) == 2     # 3 inputs, none rank 4
    cnn = _image_model(tmp_path)
    assert cli([cnn, "-o", out, "--text", text_file, "--tokenizer", tokenizer_json]) == 3
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# the optional libraries


def test_optional_libraries_not_imported_by_the_core():
    import subprocess
    import sys
    code = ("import sys, spa.calib_build, spa.activations; "
            "print(sorted(m for m in ('PIL', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_missing_library_says_what_to_install(tmp_path, image_dir, text_file, tokenizer_json,
                                              monkeypatch, capsys):
    out = tmp_path / "x.npz"
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    assert cli([_image_model(tmp_path), "-o", out, "--images", image_dir]) == 2
    assert "pip install 'spa-prune[calib]'" in capsys.readouterr().out
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    assert cli([_bert_model(tmp_path), "-o", out, "--text", text_file, "--tokenizer",
                tokenizer_json]) == 2
    assert "pip install 'spa-prune[calib]'" in capsys.readouterr().out
    assert not out.exists()

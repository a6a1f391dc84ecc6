"""Load model, GPU and calibration profiles; turn an HF ``config.json`` into a :class:`ModelSpec`.

Profiles are data under the repository's ``profiles/`` folder (override with ``VRAMPLAN_PROFILES``).
:func:`spec_from_hf_config` is pure; the loaders do file IO only. A hub id is resolved lazily through
``huggingface_hub`` (config.json only, never weights).
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from vramplan.specs import GpuSpec, ModelSpec, Search, SpecError

#: model_type -> family facts that the config.json does not spell out (read from transformers 5.x
#: ``models/<family>/modeling_<family>.py`` and ``configuration_<family>.py``).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"tie_default": False},
    "mistral": {"tie_default": False},
    "mixtral": {"tie_default": False, "moe": True},
    # Qwen2Attention: q/k/v_proj bias=True, o_proj bias=False (hard-coded).
    "qwen2": {"tie_default": False, "qkv_bias": True, "o_bias": False},
    # Qwen3Attention: q_norm/k_norm RMSNorm(head_dim); biases follow attention_bias.
    "qwen3": {"tie_default": False, "qk_norm": True},
    # GemmaModel scales embeddings by sqrt(hidden_size); tied by default. GemmaRMSNorm computes
    # in fp32 and returns type_as(x).
    "gemma": {"tie_default": True, "scaled_embeddings": True, "norm_style": "gemma"},
    # Gemma2DecoderLayer: input, post_attention, pre_feedforward, post_feedforward norms;
    # soft-capped attention: transformers 5.x refuses SDPA; every other layer slides.
    "gemma2": {"tie_default": True, "scaled_embeddings": True, "norm_style": "gemma",
               "post_norms": True, "sdpa": False, "sliding": True},
    # Phi3Attention: one qkv_proj; Phi3MLP: one gate_up_proj; apply_rotary_pos_emb concatenates
    # the rotated and passed-through parts (torch.cat), a fresh (b, nh, s, hd) tensor.
    "phi3": {"tie_default": False, "fused_qkv": True, "fused_gate_up": True, "rope_cat": True},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "vocab_size")
#: Integer keys that may be absent, but must be whole and positive when present.
_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings",
                      "num_local_experts", "num_experts_per_tok")


def profiles_dir() -> Path:
    """The profiles folder: $VRAMPLAN_PROFILES, else ``profiles/`` of a source checkout, else the
    copy an installed wheel carries as ``vramplan/_profiles``."""
    env = os.environ.get("VRAMPLAN_PROFILES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    checkout = here.parent / "profiles"
    return checkout if (checkout / "gpus.toml").is_file() else here / "_profiles"


def list_models(engine: str = "any") -> list[str]:
    """Names of the shipped model profiles, sorted: all of them, or ("analytic") those whose
    model_type the analytic engine knows (the others are answered by the trace engine)."""
    names = sorted(p.stem for p in (profiles_dir() / "models").glob("*.json"))
    if engine == "analytic":
        return [n for n in names if model_type_of(n) in SUPPORTED_MODEL_TYPES]
    return names


def profile_source(name: str) -> dict[str, Any]:
    """The ``source`` block of a shipped profile (hub id, notes, stored counts)."""
    return dict(_read_json(profiles_dir() / "models" / f"{name}.json").get("source") or {})


def model_type_of(name: str) -> str:
    """The model_type of a shipped profile."""
    return str(_read_json(profiles_dir() / "models" / f"{name}.json")["config"].get("model_type"))


def spec_from_hf_config(config: dict[str, Any], name: str) -> ModelSpec:
    """ModelSpec from an HF config.json dict (pure; raises SpecError on anything unusable)."""
    if not isinstance(config, dict):
        raise SpecError(f"{name}: config.json must hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise SpecError(f"{name}: the analytic engine does not know model_type {model_type!r} "
                        f"(it knows {', '.join(SUPPORTED_MODEL_TYPES)}); `vramplan estimate "
                        f"{name} --engine trace` traces any architecture transformers ships")
    missing = [k for k in _REQUIRED_KEYS if config.get(k) is None]
    if missing:
        raise SpecError(f"{name}: config.json lacks {', '.join(missing)}")
    fam = FAMILIES[model_type]
    for key in _REQUIRED_KEYS + _OPTIONAL_INT_KEYS:
        value = config.get(key)
        if value is None and key not in _REQUIRED_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{name}: config.json {key} must be a whole number, got {value!r}")
        if value <= 0 and key not in ("num_local_experts", "num_experts_per_tok"):
            raise SpecError(f"{name}: config.json {key} must be positive, got {value}")
    if fam.get("moe") and not (config.get("num_local_experts")
                                        and config.get("num_experts_per_tok")):
        raise SpecError(f"{name}: a mixtral config.json needs num_local_experts and "
                        "num_experts_per_tok (it would be estimated as a dense model)")
    if config["hidden_size"] % config["num_attention_heads"] and not config.get("head_dim"):
        raise SpecError(f"{name}: hidden_size {config['hidden_size']} is not a multiple of "
                        f"num_attention_heads {config['num_attention_heads']} and head_dim is "
                        "not given")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // heads
        bias = bool(config.get("attention_bias", False))
        return ModelSpec(
            name=name,
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", fam["tie_default"])),
            qkv_bias=fam.get("qkv_bias", bias),
            o_bias=fam.get("o_bias", bias),
            mlp_bias=bool(config.get("mlp_bias", False)),
            fused_qkv=fam.get("fused_qkv", False),
            fused_gate_up=fam.get("fused_gate_up", False),
            rope_cat=fam.get("rope_cat", False),
            norms_per_layer=4 if fam.get("post_norms") else 2,
            post_norms=fam.get("post_norms", False),
            norm_style=fam.get("norm_style", "llama"),
            sdpa=fam.get("sdpa", True),
            qk_norm=fam.get("qk_norm", False),
            num_local_experts=int(config.get("num_local_experts") or 0),
            num_experts_per_tok=int(config.get("num_experts_per_tok") or 0),
            final_logit_softcapping=config.get("final_logit_softcapping"),
            attn_logit_softcapping=config.get("attn_logit_softcapping"),
            scaled_embeddings=fam.get("scaled_embeddings", False),
            sliding_window=config.get("sliding_window") if fam.get("sliding") else None,
            max_context=int(config["max_position_embeddings"])
            if config.get("max_position_embeddings") else None,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{name}: malformed config.json value ({exc})") from None


def load_hf_config(ref: str) -> tuple[str, dict[str, Any]]:
    """(display name, HF config dict) for a profile name, a config.json path or folder, or a hub id."""
    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise SpecError(f"{ref}: folder has no config.json")
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise SpecError(f"{ref}: no such file")
        return path.parent.name if path.name == "config.json" else path.stem, _read_config(path)
    profile = profiles_dir() / "models" / f"{ref}.json"
    if profile.is_file():
        return ref, _read_json(profile)["config"]
    if ref.startswith((".", "/", "~")) or ref.endswith("/") or "\\" in ref:
        raise SpecError(f"{ref}: no such file or folder")
    if "/" in ref:
        shipped = shipped_profile_for(ref)
        if shipped is not None:
            return shipped, _read_json(profiles_dir() / "models" / f"{shipped}.json")["config"]
        return ref, _fetch_hub_config(ref)
    close = difflib.get_close_matches(ref, list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `vramplan profiles` to list them"
    raise SpecError(f"unknown model {ref!r}: not a profile, a config.json path or a hub id{hint}")


def resolve_ref(ref: str, anchor: Path | None) -> str:
    """A model ref as written in a matrix or a results file, made independent of the current
    folder: a relative path that does not exist here is looked up against ``anchor`` (the file's
    folder) and its parents (the checkout it belongs to). Anything else is returned unchanged."""
    path = Path(ref)
    if anchor is None or path.is_absolute() or path.exists() or "/" not in ref:
        return ref
    for base in (anchor, *anchor.parents):
        if (base / path).exists():
            return str(base / path)
    return ref


def load_model(ref: str) -> ModelSpec:
    """ModelSpec for a profile name, config.json path/folder or hub id."""
    name, config = load_hf_config(ref)
    return spec_from_hf_config(config, name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a JSON object")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    # A shipped-profile-shaped file ({"name", "source", "config"}) is accepted as a path too.
    return data["config"] if isinstance(data.get("config"), dict) else data


def shipped_profile_for(hub_id: str) -> str | None:
    """The shipped profile whose source is this hub id (no network needed), if any."""
    for name in list_models():
        data = _read_json(profiles_dir() / "models" / f"{name}.json")
        if str((data.get("source") or {}).get("hub_id", "")).lower() == hub_id.lower():
            return name
    return None


#: Seconds to wait for the hub before saying it is unreachable.
HUB_TIMEOUT_S = 2.0


def _fetch_hub_config(hub_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SpecError(f"{hub_id}: fetching a hub config needs huggingface_hub "
                        "(pip install 'vramplan[harness]')") from None
    _require_hub(hub_id)
    try:
        import logging
        import warnings

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_json(Path(hf_hub_download(hub_id, "config.json",
                                                   etag_timeout=HUB_TIMEOUT_S)))
    except SpecError:
        raise
    except Exception as exc:  # network, auth, missing repo: all one clear line
        raise SpecError(f"{hub_id}: could not fetch config.json from the hub "
                        f"({type(exc).__name__})") from None


def _require_hub(hub_id: str) -> None:
    """Fail within HUB_TIMEOUT_S, in one line, when the hub cannot be reached (offline, proxy),
    instead of the library's retries; HF_HUB_OFFLINE=1 is honoured."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise SpecError(f"{hub_id}: HF_HUB_OFFLINE is set and no shipped profile has this hub id; "
                        "pass a config.json path (see `vramplan profiles`)")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        raise SpecError(f"{hub_id}: cannot reach {host} within {HUB_TIMEOUT_S:g} s (offline?) "
                        "and no shipped profile has this hub id; pass a config.json path") from None


@lru_cache(maxsize=None)
def load_gpus() -> dict[str, GpuSpec]:
    """The GPU catalog (profiles/gpus.toml) keyed by slug, in file order."""
    path = profiles_dir() / "gpus.toml"
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return {key: GpuSpec(key=key, name=g["name"], memory_bytes=int(g["memory_bytes"]),
                         gpu_class=g["class"], vendor=g.get("vendor", "nvidia"),
                         bf16_tflops=g.get("bf16_tflops"),
                         price_usd_per_hour=g.get("price_usd_per_hour"),
                         memory_source=g.get("memory_source", ""),
                         tflops_source=g.get("tflops_source", ""),
                         price_source=g.get("price_source", ""),
                         cuda_capacity_bytes=int(g.get("cuda_capacity_bytes", 0)),
                         cuda_capacity_source=g.get("cuda_capacity_source", ""),
                         fp16_tflops=g.get("fp16_tflops"),
                         memory_bandwidth_gbs=g.get("memory_bandwidth_gbs"),
                         bandwidth_source=g.get("bandwidth_source", ""))
            for key, g in data["gpu"].items()}


@lru_cache(maxsize=None)
def load_planner_settings() -> dict[str, Any]:
    """profiles/planner.toml: the planner's search bounds."""
    with (profiles_dir() / "planner.toml").open("rb") as fh:
        return tomllib.load(fh)


def load_search() -> Search:
    """The planner's search bounds (profiles/planner.toml [search]), for its callers to pass."""
    s = load_planner_settings()["search"]
    return Search(int(s["max_seq_len"]), int(s["max_batch"]), int(s["max_gpus"]),
                  str(s["fallback_shard"]))


def load_gpu(key: str) -> GpuSpec:
    """One catalog GPU by slug (exact match; suggestions in the error)."""
    gpus = load_gpus()
    if key in gpus:
        return gpus[key]
    close = difflib.get_close_matches(key, list(gpus), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(gpus)}"
    raise SpecError(f"unknown GPU {key!r}{hint}")


def load_calibration(name: str = "default") -> dict[str, Any]:
    """A calibration (constants + provenance): profiles/calibration/NAME.toml, or a .toml path
    (what `vramplan calibrate --out` wrote)."""
    given = Path(name)
    path = given if name.endswith(".toml") or given.parent != Path(".") else \
        profiles_dir() / "calibration" / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (profiles_dir() / "calibration").glob("*.toml")))
        raise SpecError(f"no calibration {name!r} ({path} does not exist; shipped: {known})")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML ({exc})") from None
    missing = [k for k in ("non_allocator", "cublas_workspace") if k not in data]
    if missing:
        raise SpecError(f"{path}: not a vramplan calibration (lacks {', '.join(missing)}; "
                        "write one with `vramplan calibrate`)")
    return data

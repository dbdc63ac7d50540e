"""rwkv-jax: RWKV language models (versions 1-7) as functional Flax modules.

    import rwkv_jax as rj
    cfg = rj.RWKVConfig(version=7, n_layer=2, n_embd=128, vocab_size=256)
    model = rj.RWKV(cfg)
    params = model.init(key, tokens)["params"]
    logits, state = model.apply({"params": params}, tokens)
"""

from rwkv_jax import tokenizers
from rwkv_jax.config import RWKVConfig
from rwkv_jax.generation import DecodingParams, GenerationResult, generate, iter_generate, prepare_decoding
from rwkv_jax.io.convert import load_checkpoint, save_checkpoint
from rwkv_jax.io.official import load_pth, save_pth
from rwkv_jax.io.orbax_params import load_params, save_params
from rwkv_jax.io.state_files import load_state_pth, save_state_pth
from rwkv_jax.model import RWKV
from rwkv_jax.state import init_state, state_from_official, state_to_official

__all__ = ["DecodingParams", "GenerationResult", "RWKVConfig", "RWKV", "generate", "init_state", "iter_generate",
           "load_checkpoint", "load_params", "load_pth", "load_state_pth", "prepare_decoding", "save_checkpoint",
           "save_params", "save_pth", "save_state_pth", "state_from_official", "state_to_official", "tokenizers"]
__version__ = "0.1.0"

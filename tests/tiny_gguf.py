"""Writes a tiny LLaMA GGUF the way llama.cpp's converter does (q/k rows permuted for its RoPE)."""
import gguf
import numpy as np

from halo_mpi.model.tokenizer import byte_symbols

DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 32, 2, 4, 2, 64


def llama_cpp_permute(w, n_heads):
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, arch="llama", seed=0):
    """Returns the Hugging Face layout weights it wrote, by GGUF tensor name."""
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_symbols()
    hd = DIM // HEADS
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(128)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    hf = {"token_embd.weight": rng.standard_normal((len(tokens), DIM)),
          "output_norm.weight": 1 + 0.1 * rng.standard_normal(DIM)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        hf.update({b + "attn_norm.weight": 1 + 0.1 * rng.standard_normal(DIM),
                   b + "ffn_norm.weight": 1 + 0.1 * rng.standard_normal(DIM),
                   b + "attn_q.weight": rng.standard_normal((HEADS * hd, DIM)) * 0.2,
                   b + "attn_k.weight": rng.standard_normal((KV_HEADS * hd, DIM)) * 0.2,
                   b + "attn_v.weight": rng.standard_normal((KV_HEADS * hd, DIM)) * 0.2,
                   b + "attn_output.weight": rng.standard_normal((DIM, HEADS * hd)) * 0.2,
                   b + "ffn_gate.weight": rng.standard_normal((HIDDEN, DIM)) * 0.2,
                   b + "ffn_up.weight": rng.standard_normal((HIDDEN, DIM)) * 0.2,
                   b + "ffn_down.weight": rng.standard_normal((DIM, HIDDEN)) * 0.2})
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    for name, t in hf.items():
        if name.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, HEADS)
        elif name.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, KV_HEADS)
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf

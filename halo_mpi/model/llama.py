"""The single-process LLaMA: RMSNorm, RoPE, GQA attention with KV cache, SwiGLU MLP.

It reads its weights from the HDF5 store and knows nothing about MPI: every distributed mode is
tested against it. A block's forward is two residual lines; a block's attention and MLP are any
callables of the same shape, so the tensor-parallel engine can swap in distributed ones from
outside (and the output head and the embedding lookup likewise).

    model = Transformer.from_store(Store("weights/smollm2-135m.h5"))
    cache = model.new_cache(max_len=256)
    logits = model(torch.tensor(ids), cache)          # (T, vocab) for the prompt
    logits = model(torch.tensor([next_id]), cache)    # (1, vocab), one decode step
    logits = model.step([(cache_a, [id_a]), (cache_b, prompt_chunk)])   # (2, vocab): a ragged batch

A step over several sequences (`step`) flattens their new tokens into the rows of one h (N, dim):
every row-wise part (embedding, norms, the qkv, o and MLP matmuls, the head) runs once over all
N rows, so each weight is read once per step whatever the batch; only the attention core (RoPE at
each sequence's positions, its cache, its causal attention) goes sequence by sequence.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HaloError
from .config import ModelArgs
from .embedding import StoreEmbedding
from .groups import GroupMLP
from .linear import DTYPES, Linear, make_linear, pack_linears
from .qlinear import QuantRows
from .quant import from_records, records_dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def rope_tables(args: ModelArgs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, (max_len, head_dim), for rotate-half RoPE (the Hugging Face layout):
    the first half of sin negated, so that rotating is a roll of the halves (see apply_rope)."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64)
                                          / args.head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hd/2)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) written as the halves
    swapped (a roll) times the signed sin: three ops, not seven (decode runs this per layer)."""
    # x (heads, T, hd); cos/signed_sin (T, hd)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Rope:
    """cos, sin (T, hd) for positions pos .. pos+T-1; the tables grow by doubling."""

    def __init__(self, args: ModelArgs):
        self.args = args
        self.cos, self.sin = rope_tables(args, 0)

    def __call__(self, pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if pos + T > self.cos.shape[0]:
            size = min(max(pos + T, 2 * self.cos.shape[0], 256), max(self.args.max_seq_len, pos + T))
            self.cos, self.sin = rope_tables(self.args, size)
        return self.cos[pos:pos + T], self.sin[pos:pos + T]


class KVCache:
    """Keys and values of one sequence for a set of layers: (n_kv, max_len, hd) per layer, n_kv
    being the KV heads the layer's attention holds (all of them in the reference model)."""

    def __init__(self, args: ModelArgs, max_len: int, kv_heads: dict[int, int]):
        if max_len > args.max_seq_len:
            raise HaloError(f"{max_len} tokens exceed the model's context of {args.max_seq_len}; "
                            f"shorten the prompt or --max-new-tokens")
        self.max_len = max_len
        self.k = {layer: torch.zeros(n, max_len, args.head_dim) for layer, n in kv_heads.items()}
        self.v = {layer: torch.zeros(n, max_len, args.head_dim) for layer, n in kv_heads.items()}
        self.pos = 0  # tokens already stored (advanced by the model after the last layer)


@dataclass
class Ragged:
    """One step over several sequences: what `Attention.ragged` needs beside h (N, dim)."""
    caches: list[KVCache]       # each sequence's cache, in row order (pos: its tokens so far)
    lengths: list[int]          # each sequence's new tokens (rows of h), in order; sum = N
    cos: torch.Tensor           # (N, hd) RoPE tables at every row's own position
    sin: torch.Tensor           # (N, hd) signed sin, likewise

    def spans(self):
        """(cache, first row, end row) of each sequence."""
        a = 0
        for cache, n in zip(self.caches, self.lengths):
            yield cache, a, a + n
            a += n


class Attention:
    """GQA self-attention over a set of the layer's attention groups (one group = one KV head
    with its query heads); over all of them in the reference model. The outputs of disjoint
    group sets sum to the layer's attention output: o[:, S] @ attend_S(x)."""

    def __init__(self, args: ModelArgs, groups: np.ndarray, ids=None, dtype: torch.dtype = torch.float32):
        # groups: (n, (2*n_rep+2)*hd, dim) float as stored, rows q | k | v | o^T per group, or
        # (n,) quantized records with fields qkv ((n_rep+2)*hd, dim) and o (dim, n_rep*hd);
        # ids: their KV heads
        self.args = a = args
        n = groups.shape[0]
        self.ids = np.arange(n) if ids is None else np.asarray(ids)
        self.n_kv, self.n_heads = n, n * a.n_rep
        R, hd = a.n_rep * a.head_dim, a.head_dim
        # q, k, v fused into one ((n_heads + 2*n_kv)*hd, dim) weight: one matmul per token, rows
        # ordered as all groups' q, then all k, then all v
        if records_dtype(groups):
            qkv = from_records(groups, "qkv")                        # (n*(R+2hd), dim), per group
            per = np.arange(n * (R + 2 * hd)).reshape(n, R + 2 * hd)
            order = np.concatenate([per[:, :R].ravel(), per[:, R:R + hd].ravel(), per[:, R + hd:].ravel()])
            self.qkv = make_linear(qkv.take_rows(order))
            self.o = make_linear(from_records(groups, "o", axis=1))  # W_o[:, S]: (dim, n_heads*hd)
        else:
            w = torch.from_numpy(np.ascontiguousarray(groups))
            q, k, v, o_t = w.split([R, hd, hd, R], dim=1)
            self.qkv = make_linear(torch.cat([q.reshape(-1, a.dim), k.reshape(-1, a.dim),
                                              v.reshape(-1, a.dim)]), dtype)
            self.o = make_linear(o_t.reshape(-1, a.dim).T, dtype)    # W_o[:, S]: (dim, n_heads*hd)
        self.n_qk = self.n_heads + self.n_kv                         # heads that get RoPE

    def append(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Store the K/V of x (T, dim) at pos .. pos+T-1; returns the queries (n_heads, T, hd)."""
        T, hd = x.shape[0], self.args.head_dim
        heads = self.qkv(x).view(T, self.n_qk + self.n_kv, hd).transpose(0, 1)
        qk = apply_rope(heads[:self.n_qk], cos, sin)                 # (nh+n_kv, T, hd)
        k_cache[:, pos:pos + T] = qk[self.n_heads:]                  # (n_kv, T, hd)
        v_cache[:, pos:pos + T] = heads[self.n_qk:]                  # (n_kv, T, hd)
        return qk[:self.n_heads]

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """Queries (n_heads, T, hd) at pos.. over the cache up to pos+T -> this set's (T, dim)."""
        return self.o(self.core(q, k_cache, v_cache, pos))

    def core(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """Queries (n_heads, T, hd) at pos.. over the cache up to pos+T -> heads' outputs (T, nh*hd)."""
        T = q.shape[1]
        S = pos + T
        mask = None
        if T > 1:  # causal within the new tokens, all of the cached past visible
            mask = torch.ones(T, S, dtype=torch.bool).tril(pos)          # (T, S) True = attend
        out = F.scaled_dot_product_attention(q[None], k_cache[None, :, :S], v_cache[None, :, :S],
                                             attn_mask=mask, enable_gqa=True)  # (1, nh, T, hd)
        return out[0].transpose(0, 1).reshape(T, -1)                     # (T, nh, hd) -> (T, nh*hd)

    def ragged(self, x: torch.Tensor, batch: Ragged, layer: int) -> torch.Tensor:
        """x (N, dim) holding several sequences' new rows (see Ragged) -> (N, dim): the qkv and o
        matmuls once over all rows, RoPE at each row's position, each sequence's K/V stored in its
        own cache and its queries attending over that cache alone."""
        return self.ragged_over(x, batch, [(c.k[layer], c.v[layer], c.pos) for c in batch.caches])

    def ragged_over(self, x: torch.Tensor, batch: Ragged,
                    stores: list[tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
        """`ragged` with each sequence's (k_cache, v_cache, pos) given: caches held elsewhere than
        in batch.caches (tensor mode's attention groups keep their own)."""
        N, hd, nh = x.shape[0], self.args.head_dim, self.n_heads
        heads = self.qkv(x).view(N, self.n_qk + self.n_kv, hd).transpose(0, 1)  # (nh+2n_kv, N, hd)
        qk = apply_rope(heads[:self.n_qk], batch.cos, batch.sin)                 # (nh+n_kv, N, hd)
        outs = []
        for (k_cache, v_cache, pos), (_, a, b) in zip(stores, batch.spans()):
            k_cache[:, pos:pos + b - a] = qk[nh:, a:b]                           # (n_kv, T, hd)
            v_cache[:, pos:pos + b - a] = heads[self.n_qk:, a:b]                 # (n_kv, T, hd)
            outs.append(self.core(qk[:nh, a:b], k_cache, v_cache, pos))          # (T, nh*hd)
        return self.o(torch.cat(outs))                                           # (N, dim)

    def __call__(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.attend(self.append(x, k_cache, v_cache, pos, cos, sin), k_cache, v_cache, pos)

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes

    def linears(self) -> list:
        """Its weight layers, in a fixed order (a loader streams and binds their tensors)."""
        return [self.qkv, self.o]


class Block:
    def __init__(self, args: ModelArgs, layer: int, attn_norm, ffn_norm, attention: Attention,
                 feed_forward: Callable[[torch.Tensor], torch.Tensor]):
        self.args, self.layer = args, layer
        self.attn_norm, self.ffn_norm = torch.from_numpy(attn_norm), torch.from_numpy(ffn_norm)
        self.attention, self.feed_forward = attention, feed_forward

    def __call__(self, x, cache: KVCache, cos, sin):
        eps = self.args.norm_eps
        h = x + self.attention(rms_norm(x, self.attn_norm, eps), cache.k[self.layer],
                               cache.v[self.layer], cache.pos, cos, sin)
        return h + self.feed_forward(rms_norm(h, self.ffn_norm, eps))

    def ragged(self, x: torch.Tensor, batch: Ragged) -> torch.Tensor:
        """The block over several sequences' rows x (N, dim) (see Ragged)."""
        eps = self.args.norm_eps
        h = x + self.attention.ragged(rms_norm(x, self.attn_norm, eps), batch, self.layer)
        return h + self.feed_forward(rms_norm(h, self.ffn_norm, eps))


class Transformer:
    """The model, or a contiguous slice of its layers (pipeline stages hold one slice each)."""

    def __init__(self, args: ModelArgs, blocks: dict[int, Block], embedding=None, norm=None,
                 output=None, dtype: torch.dtype = torch.float32):
        # embedding, output: (vocab, dim) float arrays or (vocab,) quantized row records; with
        # tied embeddings pass the same array twice
        self.args, self.blocks, self.dtype = args, blocks, dtype
        self.norm = None if norm is None else torch.from_numpy(norm)                  # (dim,)
        # output: (T, dim) -> (T, vocab); a Linear here, a distributed head in tensor mode
        self.output = None
        if output is not None:
            self.output = make_linear(from_records(output, "row") if records_dtype(output) else output, dtype)
        quantized = embedding is not None and records_dtype(embedding) is not None
        tied = embedding is not None and embedding is output and not quantized
        # tied float: rows are looked up in the head's weight, so the (vocab, dim) table is held
        # once; quantized: the stored rows are kept (a packed kernel layout has no row lookup)
        self.embedding = (None if embedding is None or tied else
                          QuantRows(embedding, "row") if quantized else torch.from_numpy(embedding))
        # lookup: token ids (T,) -> (T, dim); tensor mode reads the rows from the store instead
        self.lookup: Callable[[torch.Tensor], torch.Tensor] | None = (
            self.output.rows if tied else (self.embedding.__getitem__ if self.embedding is not None
                                           else None))
        self.rope = Rope(args)

    @classmethod
    def from_store(cls, store, layers: Iterable[int] | None = None, embedding: bool | str = True,
                   head: bool | Callable[[], Callable] = True, dtype: str | torch.dtype = torch.float32,
                   mlp: Callable[[int], Callable] | None = None,
                   attention: Callable[[int], Callable] | None = None) -> Transformer:
        """Load the given layers (all by default); `mlp(layer)` and `attention(layer)` may supply
        each block's MLP and attention (tensor mode's distributed ones, budgeted ones).
        embedding: True holds the table; "rows" reads the rows of the tokens embedded from the
        store as they come (keep it open); False: none. head: True holds the final norm and the
        output head; a factory supplies the head (a vocabulary slice, a distributed or streamed
        head) beside the stored final norm; False: neither."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        args = store.args
        layers = range(args.n_layers) if layers is None else layers
        blocks = {}
        for layer in layers:
            attn_norm, ffn_norm = store.layer_norms(layer)
            blocks[layer] = Block(args, layer, attn_norm, ffn_norm,
                                  attention(layer) if attention else
                                  Attention(args, store.attn_groups(layer), dtype=dtype),
                                  mlp(layer) if mlp else GroupMLP(store.mlp_groups(layer), dtype=dtype))
        stored_head = head is True
        table = embedding is True
        emb = store.embedding() if table or (stored_head and args.tied_embeddings) else None
        out = (emb if args.tied_embeddings else store.output()) if stored_head else None
        model = cls(args, blocks, embedding=emb if table else None,
                    norm=store.final_norm() if head else None, output=out, dtype=dtype)
        if callable(head):
            model.output = head()
        if embedding == "rows":
            model.lookup = StoreEmbedding(store)
        return model

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.args, max_len, {l: b.attention.n_kv for l, b in self.blocks.items()})

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lookup(tokens)                             # (T,) -> (T, dim)

    def layers(self, h: torch.Tensor, cache: KVCache, layer_ids=None) -> torch.Tensor:
        """Run the held blocks (or the given ones) on h (T, dim); does not advance the cache."""
        T = h.shape[0]
        if cache.pos + T > cache.max_len:
            raise HaloError(f"sequence of {cache.pos + T} tokens overflows the KV cache of "
                            f"{cache.max_len}")
        cos, sin = self.rope(cache.pos, T)
        for layer in (self.blocks if layer_ids is None else layer_ids):
            h = self.blocks[layer](h, cache, cos, sin)
        return h

    def batches(self) -> bool:
        """Whether `step` can run: every block's attention is the reference one (a distributed or
        streamed attention has no ragged path), with the embedding and the head held here."""
        return (self.lookup is not None and self.output is not None and self.norm is not None
                and all(type(b.attention) is Attention for b in self.blocks.values()))

    def pack_for_batches(self):
        """Every float32 weight also kept in oneDNN's layout for several rows at once (see
        model/linear.py: a batched step's matmuls then cost about one row's); doubles their memory."""
        pack_linears([self.output] + [lin for b in self.blocks.values()
                                      for lin in b.attention.linears() + b.feed_forward.linears()])

    def packed_bytes(self) -> int:
        """Bytes of the copies pack_for_batches made (beside weight_bytes)."""
        parts = [self.output] + [lin for b in self.blocks.values()
                                 for lin in b.attention.linears() + b.feed_forward.linears()]
        return sum(part.packed_bytes for part in parts if isinstance(part, Linear))

    @torch.inference_mode()
    def step(self, feeds: list[tuple[KVCache, list[int]]]) -> torch.Tensor:
        """One step over several sequences: feeds are (its cache, its new token ids: one when it
        decodes, a chunk of its prompt when it prefills); returns the logits after each one's last
        new token, (B, vocab), and advances every cache."""
        caches, lengths = [c for c, _ in feeds], [len(ids) for _, ids in feeds]
        h = self.embed(torch.tensor([t for _, ids in feeds for t in ids]))     # (N, dim)
        h = self.ragged(h, caches, lengths)
        return self.head(h[last_rows(lengths)])                                # (B, vocab)

    def ragged(self, h: torch.Tensor, caches: list[KVCache], lengths: list[int]) -> torch.Tensor:
        """The held blocks over several sequences' new rows h (N, dim), `lengths[i]` rows of
        sequence i in order (see Ragged); every cache advanced by its rows. A pipeline stage runs
        its slice of layers this way; `step` is embedding + this + head."""
        for cache, n in zip(caches, lengths):
            if cache.pos + n > cache.max_len:
                raise HaloError(f"sequence of {cache.pos + n} tokens overflows the KV cache of "
                                f"{cache.max_len}")
        tables = [self.rope(c.pos, n) for c, n in zip(caches, lengths)]
        batch = Ragged(caches, lengths, torch.cat([cos for cos, _ in tables]),   # (N, hd)
                       torch.cat([sin for _, sin in tables]))                   # (N, hd)
        for block in self.blocks.values():
            h = block.ragged(h, batch)
        for cache, n in zip(caches, lengths):
            cache.pos += n
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(rms_norm(h, self.norm, self.args.norm_eps))  # (T, dim) -> (T, vocab)

    def weight_bytes(self) -> int:
        """Resident parameter bytes: what this model object holds of the weights (a distributed
        part reports its own share through `nbytes`)."""
        def size(part) -> int:
            if part is None:
                return 0
            return part.numel() * part.element_size() if isinstance(part, torch.Tensor) else part.nbytes
        n = sum(size(b.attention) + size(b.feed_forward) + size(b.attn_norm) + size(b.ffn_norm)
                for b in self.blocks.values())
        return n + size(self.output) + size(self.embedding) + size(self.norm)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits for tokens (T,) appended to the cached sequence: (T, vocab), or (1, vocab)."""
        h = self.layers(self.embed(tokens), cache)
        cache.pos += tokens.shape[0]
        return self.head(h[-1:] if last_only else h)


def last_rows(lengths: list[int]) -> torch.Tensor:
    """(B,) the row of each sequence's last new token in a ragged step's rows."""
    return torch.tensor(lengths).cumsum(0) - 1

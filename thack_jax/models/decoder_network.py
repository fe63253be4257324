"""The decoder-only transformer (Llama / Qwen2) as Flax Linen modules.

Parameter names and shapes follow the tree of docs/models_decoder.md (and the HF mapping
of `hf_decoder.py`): attention kernels are stored per head, `[D, H, Dh]` / `[H, Dh, D]`,
so grouped-query K/V (`num_kv_heads` heads) keep their own head axis and shard by `heads`.

Every call takes explicit positions `[B, L]` and key validity masks: a prompt's tokens are
its non-pad tokens wherever they sit (left or right padding), and position ids are counted
over them (`prompt_positions`), never taken from the column index.

Decoding uses an explicit cache pytree (as the T5 network does): per-layer K/V buffers
`[B, K, L, Dh]` (heads-first, logical axes `CACHE_AXES`), written in place by
`lax.dynamic_update_slice` at one slot per step, plus the key-validity mask `[B, L]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from thack_jax.models.decoder_config import DecoderConfig

NEG_INF = -1e10  # Large finite negative: keeps fully masked rows (pad queries) finite.
CACHE_AXES = ("batch", "heads", "length", "kv")  # logical axes of every cached K/V buffer
ACT_AXES = ("batch", "length", "embed")


def _dtype(name: str):
    return jnp.dtype(name)


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """Rotary inverse frequencies [Dh/2] float32, as transformers computes them (float32
    powers; Llama-3 scaling by `_compute_llama3_parameters`)."""
    dh = config.head_dim
    exponents = np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / np.float32(dh)
    inv_freq = (np.float32(1.0) / np.float32(config.rope_theta) ** exponents).astype(np.float32)
    scaling = config.rope_scaling_dict()
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, L, N, Dh], positions [B, L] int32 -> x rotated (HF's rotate_half convention:
    the first and second halves of head_dim are the pair, not interleaved elements)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, Dh/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def prompt_positions(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """mask [B, Lx] bool (True = prompt token) -> (positions [B, Lx] int32: the token's index
    among the row's prompt tokens, 0 at pad slots; lengths [B] int32)."""
    counts = jnp.cumsum(mask.astype(jnp.int32), axis=1)
    return jnp.where(mask, counts - 1, 0), counts[:, -1]


def attention_mask(query_slots, key_slots, key_valid) -> jax.Array:
    """Causal over slots, valid keys only: query_slots [Lq], key_slots [Lk] int32, key_valid
    [B, Lk] bool -> [B, Lq, Lk] bool. Slot order equals position order among valid tokens."""
    causal = key_slots[None, :] <= query_slots[:, None]
    return causal[None] & key_valid[:, None, :]


class Projection(nn.Module):
    """x [..., D] @ kernel [D, *features] (+ bias [*features]) over the last input axis,
    or with `contract=2`, x [..., H, Dh] @ kernel [H, Dh, D] over the last two."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    config: DecoderConfig
    use_bias: bool = False
    contract: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        in_shape = x.shape[-self.contract :]
        init = nn.initializers.normal(stddev=c.init_std)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.kernel_axes),
            (*in_shape, *self.features),
            _dtype(c.param_dtype),
        )
        dtype = _dtype(c.dtype)
        axes = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (axes, ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros, self.kernel_axes[self.contract :]
                ),
                self.features,
                _dtype(c.param_dtype),
            )
            y = y + bias.astype(dtype)
        return y


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: normalise in float32, cast back to the activation dtype, scale."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            _dtype(c.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + c.rms_norm_eps)).astype(_dtype(c.dtype))
        return y * scale.astype(_dtype(c.dtype))


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; softmax in float32."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        kv_axes = ("embed", "heads", "kv")
        bias = c.attention_bias
        self.query = Projection((c.num_heads, c.head_dim), kv_axes, c, use_bias=bias)
        self.key = Projection((c.num_kv_heads, c.head_dim), kv_axes, c, use_bias=bias)
        self.value = Projection((c.num_kv_heads, c.head_dim), kv_axes, c, use_bias=bias)
        self.out = Projection((c.d_model,), ("heads", "kv", "embed"), c, contract=2)

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, L, D], positions [B, L] -> q [B, L, H, Dh], k, v [B, L, K, Dh] (q, k rotated)."""
        inv_freq = rope_inv_freq(self.config)
        heads = ("batch", "length", "heads", "kv")
        q = apply_rope(self.query(x), positions, inv_freq)
        k = apply_rope(self.key(x), positions, inv_freq)
        v = self.value(x)
        return tuple(nn.with_logical_constraint(t, heads) for t in (q, k, v))

    def attend(self, q, keys, values, mask, layout: str = "bskd") -> jax.Array:
        """q [B, Lq, H, Dh] attends to keys/values [B, Lk, K, Dh] (layout 'bskd') or
        [B, K, Lk, Dh] ('bksd', the cache layout, contracted as stored); mask [B, Lq, Lk]
        bool -> [B, Lq, D]. Query head h uses K/V head h // group_size (HF's repeat_kv)."""
        c = self.config
        b, lq = q.shape[:2]
        grouped = q.reshape(b, lq, c.num_kv_heads, c.group_size, c.head_dim)
        scores = jnp.einsum(
            f"bqkgd,{layout}->bkgqs", grouped, keys, preferred_element_type=jnp.float32
        )
        scores = jnp.where(mask[:, None, None], scores * c.head_dim**-0.5, NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        out = jnp.einsum(f"bkgqs,{layout}->bqkgd", weights, values)
        out = out.reshape(b, lq, c.num_heads, c.head_dim)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return self.out(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = Projection((c.d_ff,), ("embed", "mlp"), c, name="gate")(x)
        up = Projection((c.d_ff,), ("embed", "mlp"), c, name="up")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Projection((c.d_model,), ("mlp", "embed"), c, name="down")(h)


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, L, K, Dh] -> the cache layout [B, K, L, Dh]."""
    return nn.with_logical_constraint(jnp.swapaxes(x, 1, 2), CACHE_AXES)


def _write_cache(buffer: jax.Array, x: jax.Array, slot: jax.Array) -> jax.Array:
    """Writes x [B, Lq, K, Dh] into buffer [B, K, Lmax, Dh] at slots slot..slot+Lq-1."""
    out = jax.lax.dynamic_update_slice_in_dim(buffer, _heads_first(x).astype(buffer.dtype), slot, 2)
    return nn.with_logical_constraint(out, CACHE_AXES)


class Layer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: DecoderConfig

    def setup(self):
        self.attn_norm = RMSNorm(self.config)
        self.attention = Attention(self.config)
        self.mlp_norm = RMSNorm(self.config)
        self.mlp = MLP(self.config)

    def __call__(self, x, positions, mask, prefix_kv=None, cache_kv=None, slot=None):
        """x [B, Lq, D], positions [B, Lq], mask [B, Lq, Lk] over the keys attended to:
        - neither prefix_kv nor cache_kv: this call's own keys (Lk = Lq);
        - prefix_kv (keys, values) [B, K, Lp, Dh]: the prefix, then this call's own keys
          (Lk = Lp + Lq);
        - cache_kv buffers [B, K, Lmax, Dh]: this call's keys are written at `slot`, and
          the whole buffer is attended to (Lk = Lmax).
        Returns (x, (keys, values)): this call's own K/V [B, Lq, K, Dh], or the updated
        buffers in the cached case.
        """
        h = self.attn_norm(x)
        q, k, v = self.attention.project(h, positions)
        if cache_kv is not None:
            k = _write_cache(cache_kv[0], k, slot)
            v = _write_cache(cache_kv[1], v, slot)
            x = x + self.attention.attend(q, k, v, mask, "bksd")
        elif prefix_kv is not None:
            keys = jnp.concatenate([prefix_kv[0], _heads_first(k).astype(prefix_kv[0].dtype)], 2)
            values = jnp.concatenate([prefix_kv[1], _heads_first(v).astype(prefix_kv[1].dtype)], 2)
            x = x + self.attention.attend(q, keys, values, mask, "bksd")
        else:
            x = x + self.attention.attend(q, k, v, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return nn.with_logical_constraint(x, ACT_AXES), (k, v)


class Embed(nn.Module):
    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=c.init_std), ("vocab", "embed")
            ),
            (c.vocab_size, c.d_model),
            _dtype(c.param_dtype),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(_dtype(self.config.dtype))
        return nn.with_logical_constraint(x, ACT_AXES)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output layer: x [..., D] -> logits [..., V] float32 (x @ embedding.T)."""
        dtype = _dtype(self.config.dtype)
        return jnp.dot(
            x.astype(dtype), self.embedding.astype(dtype).T, preferred_element_type=jnp.float32
        )


class DecoderLM(nn.Module):
    """The decoder-only LM. Use the pure functions of `thack_jax.models.decoder_api`."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embed = Embed(c)
        self.layers = [Layer(c) for _ in range(c.num_layers)]
        self.final_norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.lm_head = Projection((c.vocab_size,), ("embed", "vocab"), c)

    def logits_of(self, x: jax.Array) -> jax.Array:
        """Final hidden states x [B, L, D] -> logits [B, L, V] float32."""
        x = self.final_norm(x)
        if self.config.tie_word_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def hidden(self, tokens, positions, mask, prefix=None):
        """tokens [B, L] at positions [B, L] with mask [B, L, Lk] -> (hidden [B, L, D],
        per-layer own K/V). prefix: per-layer (keys, values) [B, K, Lp, Dh] tuples."""
        x = self.embed(tokens)
        kvs = []
        for i, layer in enumerate(self.layers):
            prefix_kv = None if prefix is None else (prefix[0][i], prefix[1][i])
            x, kv = layer(x, positions, mask, prefix_kv=prefix_kv)
            kvs.append(kv)
        return x, kvs

    def _last_prompt_hidden(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        """hidden [B, Lx, D] of the prompt slots -> [B, 1, D] at each row's last prompt token
        (slot 0 for an empty prompt, whose logits are then meaningless but finite)."""
        last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)

    def encode(self, inputs: jax.Array) -> dict:
        """inputs [B, Lx] -> prefill: per-layer "k"/"v" tuples of [B, K, Lx, Dh], "mask"
        [B, Lx] bool, "lengths" [B] int32, "last_logits" [B, V] float32 (the logits of each
        row's last prompt token, which predict targets[:, 0])."""
        mask = nn.with_logical_constraint(inputs != self.config.pad_id, ("batch", "length"))
        positions, lengths = prompt_positions(mask)
        slots = jnp.arange(inputs.shape[1])
        hidden, kvs = self.hidden(inputs, positions, attention_mask(slots, slots, mask))
        last = self.logits_of(self._last_prompt_hidden(hidden, mask))[:, 0]
        return {
            "k": tuple(_heads_first(k) for k, _ in kvs),
            "v": tuple(_heads_first(v) for _, v in kvs),
            "mask": mask,
            "lengths": lengths,
            "last_logits": nn.with_logical_constraint(last, ("batch", "vocab")),
        }

    def decode(self, prefill: dict, targets: jax.Array) -> jax.Array:
        """Teacher forcing on a prefill: targets [B, Ly] -> logits [B, Ly, V] float32.
        targets[:, :-1] are fed at positions lengths + s and attend to the prompt's K/V and
        causally to themselves; logits[:, 0] is the prefill's last-token logits."""
        first = prefill["last_logits"][:, None]
        ly = targets.shape[1]
        if ly == 1:
            return first
        lx = prefill["mask"].shape[1]
        steps = jnp.arange(ly - 1)
        positions = prefill["lengths"][:, None] + steps[None, :]
        key_valid = jnp.concatenate([prefill["mask"], jnp.ones_like(targets[:, 1:], bool)], 1)
        mask = attention_mask(lx + steps, jnp.arange(lx + ly - 1), key_valid)
        prefix = (prefill["k"], prefill["v"])
        hidden, _ = self.hidden(targets[:, :-1], positions, mask, prefix=prefix)
        return jnp.concatenate([first, self.logits_of(hidden)], axis=1)

    def init_cache(self, prefill: dict, max_decode_len: int) -> dict:
        """Decoding cache: per-layer "k"/"v" buffers [B, K, Lx + max_decode_len, Dh] (the
        prompt's K/V, then zeros), "mask" [B, Lx + max_decode_len] (valid keys), and the
        prefill's "prompt_mask" [B, Lx] (its width gives Lx), "lengths", "last_logits"."""
        batch, lx = prefill["mask"].shape

        def extend(buffer):
            pad = jnp.zeros(buffer.shape[:2] + (max_decode_len,) + buffer.shape[3:], buffer.dtype)
            return nn.with_logical_constraint(jnp.concatenate([buffer, pad], 2), CACHE_AXES)

        free = jnp.zeros((batch, max_decode_len), bool)
        return {
            "k": tuple(extend(k) for k in prefill["k"]),
            "v": tuple(extend(v) for v in prefill["v"]),
            "mask": jnp.concatenate([prefill["mask"], free], axis=1),
            "prompt_mask": prefill["mask"],
            "lengths": prefill["lengths"],
            "last_logits": prefill["last_logits"],
        }

    def step(self, cache: dict, token: jax.Array, step: jax.Array):
        """Feeds token [B] (targets[:, step - 1]) for step >= 1 at cache slot Lx + step - 1,
        position lengths + step - 1 -> (logits [B, V] float32 predicting targets[:, step],
        cache with the K/V written and the slot marked valid)."""
        slot = cache["prompt_mask"].shape[1] + step - 1
        position = cache["lengths"] + step - 1
        max_len = cache["mask"].shape[1]
        valid = cache["mask"] | (jnp.arange(max_len) == slot)[None, :]
        mask = valid[:, None, :]  # [B, 1, Lmax]: every valid slot precedes the new one
        x = self.embed(token[:, None])
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cache_kv = (cache["k"][i], cache["v"][i])
            x, (k, v) = layer(x, position[:, None], mask, cache_kv=cache_kv, slot=slot)
            new_k.append(k)
            new_v.append(v)
        logits = self.logits_of(x)[:, 0]
        return logits, {**cache, "k": tuple(new_k), "v": tuple(new_v), "mask": valid}

    def __call__(self, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        """Teacher forcing: inputs [B, Lx], targets [B, Ly] -> logits [B, Ly, V] float32.

        One sequence [prompt slots | targets[:, :-1]] of Lx + Ly - 1 slots: prompt slots are
        valid where inputs != pad, response slot s sits at position lengths + s. Only the
        rows' last prompt token and the response slots go through the output layer.
        """
        lx, ly = inputs.shape[1], targets.shape[1]
        mask = inputs != self.config.pad_id
        prompt_pos, lengths = prompt_positions(mask)
        responses = targets[:, :-1]
        positions = jnp.concatenate(
            [prompt_pos, lengths[:, None] + jnp.arange(ly - 1)[None, :]], axis=1
        )
        valid = jnp.concatenate([mask, jnp.ones_like(responses, bool)], axis=1)
        slots = jnp.arange(lx + ly - 1)
        tokens = jnp.concatenate([inputs, responses], axis=1)
        hidden, _ = self.hidden(tokens, positions, attention_mask(slots, slots, valid))
        last = self._last_prompt_hidden(hidden[:, :lx], mask)
        return self.logits_of(jnp.concatenate([last, hidden[:, lx:]], axis=1))

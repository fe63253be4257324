"""The T5 encoder-decoder as Flax Linen modules.

Parameter names follow t5x's example T5 network, so T5X checkpoints map one to one.
Every parameter carries logical axis names; key activations are constrained with
`nn.with_logical_constraint` (a no-op outside a mesh + rules context).

Decoding uses an explicit cache pytree instead of a mutable Flax collection: the
cross-attention keys/values are computed once per prompt by `Decoder.init_cache`, and
`Decoder.step` appends one token's self-attention keys/values per call. The cached K/V
are heads-first, [B, H, L, Dk], so that the per-step attention needs no transpose of them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from thack_jax.models.config import T5Config

NEG_INF = -1e10  # Large finite negative: keeps fully masked rows finite under softmax.


def _dtype(name: str):
    return jnp.dtype(name)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """Maps relative positions (key - query) to T5's log-spaced buckets. Same shape, int32."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # The float log is safe: the large branch is only selected where distance >= max_exact.
    large = max_exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class Dense(nn.Module):
    """x @ kernel with kernel [in, features] and logical axes `kernel_axes`."""

    features: int
    kernel_axes: tuple[str, str]
    init_std: float
    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_normal(self.init_std), self.kernel_axes),
            (x.shape[-1], self.features),
            _dtype(self.config.param_dtype),
        )
        dtype = _dtype(self.config.dtype)
        return jnp.dot(x.astype(dtype), kernel.astype(dtype))


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            _dtype(self.config.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)
        return (y * scale.astype(jnp.float32)).astype(_dtype(self.config.dtype))


class RelativePositionBias(nn.Module):
    """Learned per-head bias of the (bucketed) relative position; shared by a stack."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """query_positions [Lq], key_positions [Lk] int32 -> bias [1, H, Lq, Lk] float32."""
        c = self.config
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(_normal(c.d_model**-0.5), ("heads", "relpos_buckets")),
            (c.num_heads, c.relative_attention_num_buckets),
            _dtype(c.param_dtype),
        )
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(
            rel,
            self.bidirectional,
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
        )
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=1)  # [H, Lq, Lk]
        return bias[None]


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d_kv) scaling (T5 folds it into the init)."""

    config: T5Config

    def setup(self):
        c = self.config
        d, inner = c.d_model, c.inner_dim
        self.query = Dense(inner, ("embed", "joined_kv"), (d * c.d_kv) ** -0.5, c)
        self.key = Dense(inner, ("embed", "joined_kv"), d**-0.5, c)
        self.value = Dense(inner, ("embed", "joined_kv"), d**-0.5, c)
        self.out = Dense(d, ("joined_kv", "embed"), inner**-0.5, c)

    def _heads(self, x: jax.Array) -> jax.Array:
        b, length, _ = x.shape
        x = x.reshape(b, length, self.config.num_heads, self.config.d_kv)
        return nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, Lk, D] -> keys, values [B, Lk, H, Dk]."""
        return self._heads(self.key(x)), self._heads(self.value(x))

    def attend(self, x: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array):
        """x [B, Lq, D] attends to keys/values [B, Lk, H, Dk]; bias [B|1, H|1, Lq, Lk]."""
        return self._attend(x, keys, values, bias, "bkhd")

    def attend_cached(self, x: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array):
        """`attend` on a decoding cache laid out heads-first: keys/values [B, H, Lk, Dk].

        With [B, Lk, H, Dk] XLA transposes every cached K/V at every decode step; with this
        layout the contractions read the cache as stored (docs/performance.md, Sampling).
        """
        return self._attend(x, keys, values, bias, "bhkd")

    def _attend(self, x, keys, values, bias, kv: str):
        """kv: the einsum subscripts of the keys/values layout ('bkhd' or 'bhkd')."""
        q = self._heads(self.query(x))
        scores = jnp.einsum(f"bqhd,{kv}->bhqk", q, keys, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores + bias, axis=-1).astype(values.dtype)
        out = jnp.einsum(f"bhqk,{kv}->bqhd", weights, values)
        b, lq = out.shape[:2]
        return self.out(out.reshape(b, lq, self.config.inner_dim))

    def __call__(self, x: jax.Array, kv_input: jax.Array, bias: jax.Array) -> jax.Array:
        keys, values = self.project_kv(kv_input)
        return self.attend(x, keys, values, bias)


class MLP(nn.Module):
    """Gated-GELU (v1.1) or ReLU (1.0) feed-forward block."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if c.feed_forward == "gated-gelu":
            gate = Dense(c.d_ff, ("embed", "mlp"), c.d_model**-0.5, c, name="wi_0")(x)
            linear = Dense(c.d_ff, ("embed", "mlp"), c.d_model**-0.5, c, name="wi_1")(x)
            h = jax.nn.gelu(gate, approximate=True) * linear
        else:
            h = jax.nn.relu(Dense(c.d_ff, ("embed", "mlp"), c.d_model**-0.5, c, name="wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return Dense(c.d_model, ("mlp", "embed"), c.d_ff**-0.5, c, name="wo")(h)


class EncoderLayer(nn.Module):
    config: T5Config

    def setup(self):
        self.pre_attention_layer_norm = RMSNorm(self.config)
        self.attention = Attention(self.config)
        self.pre_mlp_layer_norm = RMSNorm(self.config)
        self.mlp = MLP(self.config)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        h = self.pre_attention_layer_norm(x)
        x = x + self.attention(h, h, bias)
        x = x + self.mlp(self.pre_mlp_layer_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        self.pre_self_attention_layer_norm = RMSNorm(c)
        self.self_attention = Attention(c)
        self.pre_cross_attention_layer_norm = RMSNorm(c)
        self.encoder_decoder_attention = Attention(c)
        self.pre_mlp_layer_norm = RMSNorm(c)
        self.mlp = MLP(c)

    def __call__(self, x, self_bias, cross_kv, cross_bias, cache_kv=None, step=None):
        """One decoder layer.

        x [B, Lq, D]; self_bias [B|1, H, Lq, Lk]. Teacher forcing (cache_kv None):
        cross_kv: keys/values [B, Lx, H, Dk]. Cached decoding: cache_kv: (keys, values)
        [B, H, Lmax, Dk] into which this call's keys and values are written at position
        `step`, and cross_kv [B, H, Lx, Dk] (the heads-first cache layout of `init_cache`).
        Returns (x, (keys, values) attended to).
        """
        h = self.pre_self_attention_layer_norm(x)
        keys, values = self.self_attention.project_kv(h)
        if cache_kv is None:
            x = x + self.self_attention.attend(h, keys, values, self_bias)
            h = self.pre_cross_attention_layer_norm(x)
            x = x + self.encoder_decoder_attention.attend(h, *cross_kv, cross_bias)
        else:
            keys = _write_cache(cache_kv[0], keys, step)
            values = _write_cache(cache_kv[1], values, step)
            x = x + self.self_attention.attend_cached(h, keys, values, self_bias)
            h = self.pre_cross_attention_layer_norm(x)
            x = x + self.encoder_decoder_attention.attend_cached(h, *cross_kv, cross_bias)
        x = x + self.mlp(self.pre_mlp_layer_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), (keys, values)


CACHE_AXES = ("batch", "heads", "length", "kv")  # logical axes of every cached K/V buffer


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, L, H, Dk] -> the decoding cache layout [B, H, L, Dk]."""
    return nn.with_logical_constraint(jnp.swapaxes(x, 1, 2), CACHE_AXES)


def _write_cache(buffer: jax.Array, x: jax.Array, step: jax.Array) -> jax.Array:
    """Writes x [B, Lq, H, Dk] into buffer [B, H, Lmax, Dk] at positions step..step+Lq-1."""
    out = jax.lax.dynamic_update_slice_in_dim(buffer, _heads_first(x), step, axis=2)
    return nn.with_logical_constraint(out, CACHE_AXES)


def _padding_bias(token_mask: jax.Array) -> jax.Array:
    """token_mask [B, Lk] bool -> additive bias [B, 1, 1, Lk] float32."""
    return jnp.where(token_mask, 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


class Embed(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(_normal(1.0), ("vocab", "embed")),
            (c.vocab_size, c.d_model),
            _dtype(c.param_dtype),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(_dtype(self.config.dtype))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output layer: x [B, L, D] -> logits [B, L, V] float32."""
        dtype = _dtype(self.config.dtype)
        return jnp.dot(
            x.astype(dtype), self.embedding.astype(dtype).T, preferred_element_type=jnp.float32
        )


class Encoder(nn.Module):
    config: T5Config
    embedder: Embed

    def setup(self):
        c = self.config
        self.relpos_bias = RelativePositionBias(c, bidirectional=True)
        self.layers = [EncoderLayer(c) for _ in range(c.num_encoder_layers)]
        self.encoder_norm = RMSNorm(c)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, Lx] -> encoded [B, Lx, D]."""
        positions = jnp.arange(tokens.shape[1])
        bias = self.relpos_bias(positions, positions) + _padding_bias(tokens != self.config.pad_id)
        x = self.embedder(tokens)
        for layer in self.layers:
            x = layer(x, bias)
        return self.encoder_norm(x)


class Decoder(nn.Module):
    config: T5Config
    embedder: Embed

    def setup(self):
        c = self.config
        self.relpos_bias = RelativePositionBias(c, bidirectional=False)
        self.layers = [DecoderLayer(c) for _ in range(c.num_decoder_layers)]
        self.decoder_norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.logits_dense = Dense(c.vocab_size, ("embed", "vocab"), c.d_model**-0.5, c)

    def _logits(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = self.decoder_norm(x)
        if c.tie_word_embeddings:
            # T5 1.0 rescales before the tied projection.
            logits = self.embedder.attend(x * (c.d_model**-0.5))
        else:
            logits = self.logits_dense(x).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def init_cache(self, encoded: jax.Array, input_tokens: jax.Array, max_decode_len: int):
        """Computes cross-attention K/V once and allocates the self-attention cache.

        encoded [B, Lx, D], input_tokens [B, Lx] -> cache dict:
          self_k / self_v: per-layer tuples of [B, H, max_decode_len, Dk] (zeros),
          cross_k / cross_v: per-layer tuples of [B, H, Lx, Dk], cross_bias: [B, 1, 1, Lx].
        Per-layer tuples (not one stacked array) let XLA update each buffer in place. The
        K/V buffers are heads-first (logical axes `CACHE_AXES`), the layout the per-step
        attention contracts without transposing; the cross K/V are transposed once here.
        """
        c = self.config
        cross = [layer.encoder_decoder_attention.project_kv(encoded) for layer in self.layers]
        shape = (encoded.shape[0], c.num_heads, max_decode_len, c.d_kv)
        zeros = tuple(
            nn.with_logical_constraint(jnp.zeros(shape, _dtype(c.dtype)), CACHE_AXES)
            for _ in self.layers
        )
        return {
            "self_k": zeros,
            "self_v": zeros,
            "cross_k": tuple(_heads_first(k) for k, _ in cross),
            "cross_v": tuple(_heads_first(v) for _, v in cross),
            "cross_bias": _padding_bias(input_tokens != c.pad_id),
        }

    def step(self, cache: dict, token: jax.Array, step: jax.Array):
        """Feeds `token` [B] at decoder position `step` -> (logits [B, V] f32, new cache)."""
        max_len = cache["self_k"][0].shape[2]
        key_positions = jnp.arange(max_len)
        bias = self.relpos_bias(step[None], key_positions)  # [1, H, 1, Lmax]
        bias = bias + jnp.where(key_positions <= step, 0.0, NEG_INF)[None, None, None, :]
        x = self.embedder(token[:, None])
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cross_kv = (cache["cross_k"][i], cache["cross_v"][i])
            cache_kv = (cache["self_k"][i], cache["self_v"][i])
            x, (k, v) = layer(x, bias, cross_kv, cache["cross_bias"], cache_kv, step)
            new_k.append(k)
            new_v.append(v)
        cache = {**cache, "self_k": tuple(new_k), "self_v": tuple(new_v)}
        return self._logits(x)[:, 0], cache

    def __call__(self, encoded, input_tokens, decoder_input_tokens):
        """Teacher forcing: decoder_input_tokens [B, Ly] -> logits [B, Ly, V] float32."""
        ly = decoder_input_tokens.shape[1]
        positions = jnp.arange(ly)
        causal = jnp.where(positions[None, :] <= positions[:, None], 0.0, NEG_INF)
        self_bias = self.relpos_bias(positions, positions) + causal[None, None]
        cross_bias = _padding_bias(input_tokens != self.config.pad_id)
        x = self.embedder(decoder_input_tokens)
        for layer in self.layers:
            cross_kv = layer.encoder_decoder_attention.project_kv(encoded)
            x, _ = layer(x, self_bias, cross_kv, cross_bias)
        return self._logits(x)


class T5(nn.Module):
    """Encoder-decoder. Use the pure functions of `thack_jax.models.api` to call it."""

    config: T5Config

    def setup(self):
        self.token_embedder = Embed(self.config)
        self.encoder = Encoder(self.config, self.token_embedder)
        self.decoder = Decoder(self.config, self.token_embedder)

    def encode(self, input_tokens):
        return self.encoder(input_tokens)

    def decode(self, encoded, input_tokens, decoder_input_tokens):
        return self.decoder(encoded, input_tokens, decoder_input_tokens)

    def init_cache(self, encoded, input_tokens, max_decode_len: int):
        return self.decoder.init_cache(encoded, input_tokens, max_decode_len)

    def decode_step(self, cache, token, step):
        return self.decoder.step(cache, token, step)

    def __call__(self, input_tokens, decoder_input_tokens):
        encoded = self.encode(input_tokens)
        return self.decode(encoded, input_tokens, decoder_input_tokens)

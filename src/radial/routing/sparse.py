"""Sparse token-level routing: a decoder layer computes only the tokens that run it.

In token mode a router decides, per layer and per token, whether the token runs the whole layer
(`token_skip="layer"`) or only the layer's MLP branch (`token_skip="mlp"`, DLO's default). The
routed model drives the stock submodules of a Llama-style pre-norm decoder layer,

    mid = hidden + o_proj(attention(q_proj, k_proj, v_proj of input_layernorm(hidden)))
    out = mid + mlp(post_attention_layernorm(mid)),

so that what a token skips is not computed:

- skip="layer": every token gets this layer's keys and values (input_layernorm, k_proj / k_norm,
  v_proj, rotary from the model's cos / sin and its modeling module's rotate_half), written through the cache view the stock attention writes through, so later
  tokens attend to skipped ones and cached decoding equals uncached. Only the running tokens,
  gathered from batch x sequence into one packed set, pay the query projection, attention, output
  projection and MLP; the results are scattered back. For attention the packed queries are laid out
  per example (padded to the largest running count), each with its own row of the model's 4-D mask
  (additive, built once per forward), in blocks of the sequence's columns laid out together in one
  grid (a few operations per layer for all blocks): a block's queries read only the keys up to its
  last column (an explicit mask forgoes the causal kernel's skipped upper triangle, which would
  otherwise make packed attention dearer than dense). Where most positions run a layer of a batch
  the stock layer attends without a mask (nothing cached, padding only on the right), the running
  queries instead attend at their own positions (zeros elsewhere) through the model's attention
  function and its causal kernel, as the stock layer does: cheaper there than the staircase, though
  it computes and drops an attention row for each other position (IN_PLACE_MIN_SHARE). Without a
  cache, a layer no token runs computes nothing at all.
- skip="mlp": the stock attention module runs for every token; the post-attention norm and the MLP
  only for the gathered running tokens.

Padding never runs, except where every real token of a right-padded batch with nothing cached
runs a layer: the stock call over the whole batch (no mask, sdpa's causal kernel) is then cheaper
than packing, and no real token reads what the padding computes. `decomposition_problem` says
which layers this cannot drive; the routed model also checks once, on a few random tokens, that
the parts compose into the stock layer's forward (outputs, keys and values). Where either fails
it runs the reference, every token computed then selected, and says so
(RoutedForCausalLM.token_execution, a SparseFallbackWarning).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from radial.utils import RadialError

TOKEN_SKIPS = ("layer", "mlp")
# Implementations that take a dense [batch, 1, queries, keys] mask, so that packed queries can bring
# their own mask rows (flash and flex kernels assume a contiguous causal block of queries).
DENSE_MASK_ATTENTION = ("eager", "sdpa")
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
OPTIONAL_ATTENTION_PARTS = ("q_norm", "k_norm")  # per-head norms before rotary (Qwen3)
# A packed set of 2 to 7 tokens (typical of batched decoding) is padded to this many rows: BLAS
# runs a handful of rows slower than 8 (MKL here: 3 rows through a 768x2048 projection whose
# weights come from memory take 1.6x the time of 8 rows). One row is a fast matrix-vector product.
MIN_PACKED_ROWS = 8
# Packed queries carry an explicit mask, so attention cannot skip the causal upper triangle as the
# stock is_causal call does: over a whole prompt, one call would cost more than the dense attention.
# So the sequence is cut into column blocks of at least this many columns (at most MAX_QUERY_BLOCKS),
# and each block's running tokens attend in one call to the keys up to the block's last column only:
# a staircase under the causal triangle. (Measured here on 16 x 141 and 16 x 512 prompts: four
# blocks attend in ~0.6x the dense causal call's time where one block took ~1.0-1.2x.)
MIN_BLOCK_COLUMNS = 32
MAX_QUERY_BLOCKS = 4
# The staircase still costs ~1.2x the causal kernel per query (the explicit mask, the blocks' edges),
# plus laying out the blocks: where most positions run a layer, the causal kernel over the whole
# batch is cheaper, even though it also computes (and drops) an attention row for each other
# position. Measured here on the radial student's ARC-Challenge batch (16 x 141): in place is the
# cheaper from about 0.75 of the positions running, by ~1 ms of ~9 per layer near 1.0, and the
# forward ~1.5 % faster (on MMLU's 16 x 512 batch no difference could be measured). It needs a
# batch the stock layer attends without a mask (see TokenBatch.maskless).
IN_PLACE_MIN_SHARE = 0.8


class SparseFallbackWarning(UserWarning):
    """Token routing computes some layers for every token and selects, instead of sparsely."""


def decomposition_problem(layer: nn.Module, skip: str) -> str | None:
    """Why `layer` cannot be driven from its parts for this granularity, or None when it can."""
    name = type(layer).__name__
    children = dict(layer.named_children())
    missing = [part for part in LAYER_PARTS if part not in children]
    if missing:
        return f"{name} has no {', '.join(missing)}"
    unknown = sorted(set(children) - set(LAYER_PARTS)) + [p for p, _ in layer.named_parameters(recurse=False)]
    if unknown:
        return f"{name} has parts outside the pre-norm decomposition: {', '.join(unknown)}"
    if skip == "mlp":
        return None  # the stock attention module runs whole
    attention = children["self_attn"]
    name = type(attention).__name__
    parts = dict(attention.named_children())
    missing = [part for part in ATTENTION_PARTS if part not in parts]
    missing += [attr for attr in ("head_dim", "scaling", "layer_idx", "config") if not hasattr(attention, attr)]
    if missing:
        return f"{name} has no {', '.join(missing)}"
    unknown = sorted(set(parts) - set(ATTENTION_PARTS) - set(OPTIONAL_ATTENTION_PARTS))
    unknown += [p for p, _ in attention.named_parameters(recurse=False)]
    if unknown:
        return f"{name} has parts the sparse driver does not know: {', '.join(unknown)}"
    implementation = attention.config._attn_implementation or "eager"
    if implementation not in DENSE_MASK_ATTENTION:
        return f"attention implementation {implementation!r} takes no per-query dense mask"
    module = sys.modules[type(attention).__module__]
    needed = ["rotate_half"] + (["eager_attention_forward"] if implementation == "eager" else [])
    missing = [function for function in needed if not callable(getattr(module, function, None))]
    if missing:
        return f"{module.__name__} has no {', '.join(missing)}"
    return None


def describe_token_execution(reasons: list[str | None]) -> str:
    """"sparse", or which layers run the reference and why (reasons[i] is None where layer i is sparse)."""
    by_reason: dict[str, list[int]] = {}
    for layer, reason in enumerate(reasons):
        if reason is not None:
            by_reason.setdefault(reason, []).append(layer)
    if not by_reason:
        return "sparse"
    text = "; ".join(
        f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}: {reason}"
        for reason, layers in by_reason.items()
    )
    if sum(map(len, by_reason.values())) == len(reasons):
        return f"reference (reason: {text})"
    return f"sparse except reference (reason: {text})"


def warn_fallback(description: str) -> None:
    warnings.warn(
        f"token routing computes every token and selects, saving no compute: {description}",
        SparseFallbackWarning,
        stacklevel=3,
    )


@dataclass
class RunningTokens:
    """The tokens that run one layer.

    `tokens` index the flattened batch x sequence, row-major. The packed set computed is `rows`:
    the tokens, then, for 2 to 7 tokens, repeats of the first up to MIN_PACKED_ROWS (their results
    are dropped). `every_token`: the whole batch runs, padding-free; `every_real_token`: every
    real token runs (padding aside).
    """

    tokens: torch.Tensor
    rows: torch.Tensor
    every_token: bool
    every_real_token: bool

    @property
    def count(self) -> int:
        return self.tokens.numel()


@dataclass
class QueryLayout:
    """Where the running tokens' queries sit for attention: one flat grid of query slots holding
    every column block in turn; block b is a [batch, width_b] grid (each example's running tokens of
    the block's columns in order, then unused slots) attending to keys [0, key_end_b).

    Running token i sits at slot `slots[i]`; slot j uses the mask row of flat token `sources[j]`
    (an unused slot borrows a real token's row of its example, and its result is dropped).
    `blocks` lists (first slot, width, key_end) per block.
    """

    slots: torch.Tensor
    sources: torch.Tensor
    blocks: list[tuple[int, int, int]]


class TokenBatch:
    """What the sparse layers of one forward share: which tokens are real, and the masks and rotary
    tables flattened to one row per token (once per forward; each layer gathers its rows)."""

    def __init__(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        masks: dict[str, Any],
        position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]],
        stock_masks: dict[str, Any] | None = None,
    ) -> None:
        self.batch_size, self.seq_len = batch, seq = hidden.shape[:2]
        # Layer types the stock layers attend without a mask (nothing cached, padding on the right if
        # any: sdpa's causal kernel), so that queries laid out in place can be attended the same way.
        self.maskless = {kind for kind, mask in (stock_masks or {}).items() if mask is None}
        device = hidden.device
        self.real = None if attention_mask is None else attention_mask[:, -seq:].to(device=device, dtype=torch.bool)
        if self.real is not None and bool(self.real.all()):
            self.real = None  # no padding: spare every layer the `& real`
        self.real_count = batch * seq if self.real is None else int(self.real.sum())
        positions = torch.arange(seq, device=device)
        if self.real is None:
            last_real = torch.full((batch,), seq - 1, device=device)
        else:
            last_real = (self.real * (positions + 1)).argmax(-1)
        # An unused query slot borrows the mask row of its example's last real token (never all-masked).
        self.fallback_sources = torch.arange(batch, device=device) * seq + last_real
        self.masks = masks
        self.position_embeddings = position_embeddings
        self._mask_rows: dict[str, torch.Tensor] = {}
        self._rotary_rows: dict[str, torch.Tensor] = {}
        self._block_cuts: dict[int, torch.Tensor] = {}

    def running(self, run: torch.Tensor) -> RunningTokens:
        """Gather indices for the real tokens among `run` [batch, seq] (True: the token runs the layer)."""
        if self.real is not None:
            run = run & self.real
        batch, seq = self.batch_size, self.seq_len
        tokens = run.reshape(-1).nonzero().squeeze(1)
        count = tokens.numel()
        rows = tokens
        if 1 < count < MIN_PACKED_ROWS:
            rows = torch.cat([tokens, tokens[:1].expand(MIN_PACKED_ROWS - count)])
        return RunningTokens(tokens, rows, count == batch * seq, count == self.real_count)

    def attends_in_place(self, layer_type: str, running: RunningTokens, keys: int) -> bool:
        """Whether `running`'s queries attend at their own positions through the causal kernel (no
        mask, nothing cached, at least IN_PLACE_MIN_SHARE of the positions running) rather than packed."""
        positions = self.batch_size * self.seq_len
        return layer_type in self.maskless and keys == self.seq_len and running.count >= IN_PLACE_MIN_SHARE * positions

    def mask_rows(self, layer_type: str, dtype: torch.dtype) -> torch.Tensor:
        """The layer type's 4-D mask as [batch * seq, keys], additive (0 or the dtype's minimum):
        row t is what token t may attend to. (Boolean rows would be converted by every attention call.)"""
        if layer_type not in self._mask_rows:
            mask = self.masks[layer_type]
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
                raise RadialError(f"sparse token routing needs a materialized [batch, 1, q, k] mask, got {mask!r:.80}")
            mask = mask.expand(self.batch_size, 1, self.seq_len, mask.shape[-1])
            rows = mask.reshape(self.batch_size * self.seq_len, -1)
            if rows.dtype == torch.bool:
                rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device).masked_fill_(~rows, torch.finfo(dtype).min)
            self._mask_rows[layer_type] = rows
        return self._mask_rows[layer_type]

    def query_layout(self, running: RunningTokens, keys: int) -> QueryLayout:
        """The attention calls for `running`'s queries, against `keys` keys (cached ones first).

        The sequence's columns are cut into blocks; a block's running tokens attend to the keys up
        to its last column (a causal LM's token sees no later key), so the calls cover a staircase
        under the causal triangle instead of the whole rectangle. Computed for all blocks at once:
        a handful of operations per layer, whatever the number of blocks.
        """
        batch, seq = self.batch_size, self.seq_len
        count = min(MAX_QUERY_BLOCKS, seq // MIN_BLOCK_COLUMNS) or 1
        tokens = running.tokens
        examples = torch.div(tokens, seq, rounding_mode="floor")
        columns = tokens - examples * seq
        block_of = torch.bucketize(columns, self._cuts(count), right=True) if count > 1 else torch.zeros_like(tokens)
        # Sorted flat tokens run example by example, columns ascending: each (example, block) group is
        # a contiguous run, whose members take slots 0, 1, ... of that example's row in that block.
        group = examples * count + block_of
        sizes = torch.bincount(group, minlength=batch * count)
        group_starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.arange(tokens.numel(), device=tokens.device) - group_starts.index_select(0, group)
        widths_per_block = sizes.view(batch, count).amax(0)
        widths = widths_per_block.tolist()
        firsts = torch.cumsum(widths_per_block * batch, 0) - widths_per_block * batch
        slots = firsts.index_select(0, block_of) + examples * widths_per_block.index_select(0, block_of) + rank
        slot_examples = torch.arange(batch, device=tokens.device).repeat(count).repeat_interleave(
            widths_per_block.repeat_interleave(batch)
        )
        sources = self.fallback_sources.index_select(0, slot_examples).index_copy(0, slots, tokens)
        keys_before = keys - seq
        blocks, first = [], 0
        for block, width in enumerate(widths):
            if width:
                blocks.append((first, width, keys_before + seq * (block + 1) // count))
            first += batch * width
        return QueryLayout(slots, sources, blocks)

    def _cuts(self, count: int) -> torch.Tensor:
        """The columns where blocks 1 .. count-1 start (for bucketize), made once per forward."""
        if count not in self._block_cuts:
            cuts = [self.seq_len * block // count for block in range(1, count)]
            self._block_cuts[count] = torch.tensor(cuts, device=self.fallback_sources.device)
        return self._block_cuts[count]

    def rotary_rows(self, layer_type: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the layer type's rotary table at the given flat tokens, [tokens, head_dim] each."""
        if layer_type not in self._rotary_rows:  # cos and sin side by side, so that one gather serves both
            tables = self.position_embeddings[layer_type]
            cos, sin = (table.expand(self.batch_size, self.seq_len, -1) for table in tables)
            rows = torch.stack([cos, sin], dim=2).reshape(self.batch_size * self.seq_len, 2, -1)
            self._rotary_rows[layer_type] = rows
        return self._rotary_rows[layer_type].index_select(0, tokens).unbind(1)


def write_keys_values(layer: nn.Module, normed: torch.Tensor, batch: TokenBatch, layer_type: str, view: Any):
    """This layer's keys and values for every token (from the normed hidden states they carry),
    written through `view` as the stock attention writes them; returns all keys and values to attend to."""
    attention = layer.self_attn
    shape = (*normed.shape[:2], -1, attention.head_dim)
    keys = attention.k_proj(normed).view(shape)
    if hasattr(attention, "k_norm"):
        keys = attention.k_norm(keys)
    keys = _rotate(attention, keys.transpose(1, 2), *batch.position_embeddings[layer_type])
    values = attention.v_proj(normed).view(shape).transpose(1, 2)
    if view is None:
        return keys, values
    return view.update(keys, values, attention.layer_idx)


def write_visitor_keys_values(
    layer: nn.Module, normed_rows: torch.Tensor, tokens: torch.Tensor, batch: TokenBatch, layer_type: str, view: Any
):
    """A reuse slot's keys and values: projected for `tokens` (flat indices; `normed_rows` their
    normed hidden states) only, zeros elsewhere (the slot's mask hides them); as write_keys_values."""
    attention = layer.self_attn
    kv_heads = attention.config.num_key_value_heads
    keys = normed_rows.new_zeros(batch.batch_size * batch.seq_len, kv_heads, attention.head_dim)
    values = torch.zeros_like(keys)
    if tokens.numel():
        cos, sin = batch.rotary_rows(layer_type, tokens)
        projected = attention.k_proj(normed_rows).view(tokens.numel(), kv_heads, attention.head_dim)
        if hasattr(attention, "k_norm"):
            projected = attention.k_norm(projected)
        keys = keys.index_copy(0, tokens, _rotate(attention, projected, cos, sin))
        values = values.index_copy(0, tokens, attention.v_proj(normed_rows).view_as(projected))
    keys, values = (t.view(batch.batch_size, batch.seq_len, kv_heads, -1).transpose(1, 2) for t in (keys, values))
    if view is None:
        return keys, values
    return view.update(keys, values, attention.layer_idx)


def restrict_keys(mask: torch.Tensor, visitors: torch.Tensor, batch_size: int, own_keys: bool = False) -> torch.Tensor:
    """A [batch or 1, 1, queries, keys] mask (boolean, or additive float) that also hides the keys
    where `visitors` ([batch, positions], aligned on the last key) is False. `own_keys`: the queries
    are the forward's last tokens and each keeps its own key (what it would see if it took the slot)."""
    queries, keys = mask.shape[-2:]
    allowed = visitors[:, -keys:].view(batch_size, 1, 1, keys)
    if own_keys:
        own = torch.zeros(queries, keys, dtype=torch.bool, device=mask.device)
        diagonal = torch.arange(queries, device=mask.device)
        allowed = allowed | own.index_put_((diagonal, diagonal + keys - queries), torch.tensor(True, device=mask.device))
    mask = mask.expand(batch_size, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def run_layer_on_tokens(
    layer: nn.Module,
    hidden: torch.Tensor,
    running: RunningTokens,
    batch: TokenBatch,
    layer_type: str,
    view: Any,
    visitors: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """skip="layer": every token writes its keys and values; only `running` tokens go through the rest.

    At a reuse slot (`visitors`: [batch, keys], who left keys there) only the running tokens write
    keys and values, and they attend to the visitors' alone.
    """
    batch_size, seq = hidden.shape[:2]
    attention = layer.self_attn
    flat = hidden.reshape(batch_size * seq, -1)
    if visitors is None:
        normed = layer.input_layernorm(hidden)
        keys, values = write_keys_values(layer, normed, batch, layer_type, view)
        normed_rows = normed.reshape(batch_size * seq, -1).index_select(0, running.rows)
    else:
        normed_rows = layer.input_layernorm(flat.index_select(0, running.rows))
        tokens = running.tokens
        keys, values = write_visitor_keys_values(layer, normed_rows[: tokens.numel()], tokens, batch, layer_type, view)

    cos, sin = batch.rotary_rows(layer_type, running.rows)
    queries = attention.q_proj(normed_rows)
    queries = queries.view(queries.shape[0], -1, attention.head_dim)
    if hasattr(attention, "q_norm"):
        queries = attention.q_norm(queries)
    queries = _rotate(attention, queries, cos, sin)[: running.count]
    # sdpa reads a missing mask as causal (eager would attend to every key); reuse slots need their mask.
    causal_kernel = attention.config._attn_implementation == "sdpa" and visitors is None
    if causal_kernel and batch.attends_in_place(layer_type, running, keys.shape[2]):
        attended = _attend_in_place(attention, queries, keys, values, running, batch, **kwargs)
    else:
        attended = _attend_packed(attention, queries, keys, values, running, batch, layer_type, visitors, **kwargs)
    padding = running.rows.numel() - running.count
    if padding:
        attended = torch.cat([attended, attended[:1].expand(padding, -1)])
    mid = flat.index_select(0, running.rows) + attention.o_proj(attended)
    return flat.index_copy(0, running.tokens, mlp_residual(layer, mid)[: running.count]).view_as(hidden)


def _attend_in_place(attention: nn.Module, queries, keys, values, running: RunningTokens, batch: TokenBatch, **kwargs):
    """The running tokens' queries at their own positions (zeros elsewhere), attended as the stock
    layer attends (the model's attention function, no mask: the causal kernel); their rows of the
    result, [tokens, heads x head_dim]. The other positions' rows are computed and dropped."""
    batch_size, seq = batch.batch_size, batch.seq_len
    grid = queries.new_zeros(batch_size * seq, *queries.shape[1:]).index_copy_(0, running.tokens, queries)
    grid = grid.view(batch_size, seq, *queries.shape[1:]).transpose(1, 2)
    dropout = attention.attention_dropout if attention.training else 0.0
    function = ALL_ATTENTION_FUNCTIONS["sdpa"]
    out, _ = function(attention, grid, keys, values, None, dropout=dropout, scaling=attention.scaling, **kwargs)
    return out.reshape(batch_size * seq, -1).index_select(0, running.tokens)


def _attend_packed(
    attention: nn.Module, queries, keys, values, running: RunningTokens, batch: TokenBatch, layer_type, visitors, **kwargs
):
    """The running tokens' queries packed per example in column blocks (TokenBatch.query_layout),
    each block with its rows of the mask against the keys up to its last column; [tokens, heads x head_dim]."""
    batch_size = batch.batch_size
    mask_rows = batch.mask_rows(layer_type, queries.dtype)
    layout = batch.query_layout(running, keys.shape[2])
    grid = queries.new_zeros(layout.sources.numel(), *queries.shape[1:]).index_copy_(0, layout.slots, queries)
    masks = mask_rows.index_select(0, layout.sources)
    outs = []
    for first, width, key_end in layout.blocks:
        slots = slice(first, first + batch_size * width)
        block_queries = grid[slots].view(batch_size, width, *queries.shape[1:]).transpose(1, 2)
        mask = masks[slots, :key_end].view(batch_size, 1, width, key_end)
        if visitors is not None:
            mask = restrict_keys(mask, visitors[:, -mask_rows.shape[1] :][:, :key_end], batch_size)
        out = _attend(attention, block_queries, keys[:, :, :key_end], values[:, :, :key_end], mask, **kwargs)
        outs.append(out.reshape(batch_size * width, -1))  # [batch x slots, heads x head_dim]
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, layout.slots)


def attention_residual(
    layer: nn.Module,
    hidden: torch.Tensor,
    *,
    mask: Any,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    past_key_values: Any,
    use_cache: bool,
    **kwargs: Any,
) -> torch.Tensor:
    """The layer's first residual branch, the stock attention module run on every token."""
    attended, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    return hidden + attended


def mlp_residual(layer: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    """The layer's second residual branch added to `mid`."""
    return mid + mlp_branch(layer, mid)


def mlp_branch(layer: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    """What the layer's second residual branch adds; packed [tokens, hidden] rows go through as one
    [1, tokens, hidden] batch (mixture-of-experts blocks unpack batch, sequence and hidden)."""
    normed = layer.post_attention_layernorm(mid)
    out = layer.mlp(normed.unsqueeze(0) if normed.ndim == 2 else normed)
    out = out[0] if isinstance(out, tuple) else out  # MoE blocks of some versions also return router logits
    return out.view_as(mid)


def run_mlp_on_tokens(
    layer: nn.Module, mid: torch.Tensor, running: RunningTokens, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """skip="mlp": the MLP branch for the `running` tokens only (the others keep `mid`); `scale`
    ([batch, seq, 1], DLO's score) multiplies what the branch adds, on the running rows alone.
    `mid` (the layer's own intermediate) is updated in place and returned: no copy of the batch."""
    flat = mid.reshape(-1, mid.shape[-1])
    rows = flat.index_select(0, running.rows)
    added = mlp_branch(layer, rows)
    if scale is not None:
        added = (scale.reshape(-1, 1).index_select(0, running.rows) * added.float()).to(added.dtype)
    return flat.index_copy_(0, running.tokens, (rows + added)[: running.count]).view_as(mid)


def _rotate(attention: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of one tensor whose heads are dim 1, from the model's cos / sin tables.

    apply_rotary_pos_emb's formula with the modeling module's rotate_half, for one tensor (that
    function rotates a query and a key together; here queries and keys cover different tokens).
    """
    rotate_half = sys.modules[type(attention).__module__].rotate_half
    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def _attend(attention: nn.Module, queries, keys, values, mask, **kwargs: Any) -> torch.Tensor:
    """The model's attention over packed queries with an explicit mask: [batch, slots, heads, head_dim].

    transformers' sdpa wrapper repeats grouped key/value heads whenever a mask is given (CUDA's
    kernels take no grouped heads with a mask); on CPU torch's kernel does, so there the repeat
    (a copy of every key and value per call) is left out.
    """
    implementation = attention.config._attn_implementation or "eager"
    groups = getattr(attention, "num_key_value_groups", 1)
    dropout = attention.attention_dropout if attention.training else 0.0
    if implementation == "sdpa" and groups > 1 and queries.device.type == "cpu":
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, dropout_p=dropout, scale=attention.scaling, enable_gqa=True
        )
        return out.transpose(1, 2)
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    out, _ = function(attention, queries, keys, values, mask, dropout=dropout, scaling=attention.scaling, **kwargs)
    return out


__all__ = [
    "DENSE_MASK_ATTENTION",
    "TOKEN_SKIPS",
    "QueryLayout",
    "RunningTokens",
    "SparseFallbackWarning",
    "TokenBatch",
    "attention_residual",
    "decomposition_problem",
    "describe_token_execution",
    "mlp_residual",
    "restrict_keys",
    "run_layer_on_tokens",
    "run_mlp_on_tokens",
    "write_keys_values",
    "write_visitor_keys_values",
]

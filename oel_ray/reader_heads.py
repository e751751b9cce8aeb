"""The organism's reading heads: attention set by hand and kept frozen while the rest trains.

Trained from scratch in a build of minutes, the organism never learned to read the cell below or to
the right of P (it answered the majority cell for 5,800 steps, whatever the schedule, the RoPE base,
the heads or the tokens), nor which lessons its prompt holds (the same replies with and without
each one after 300 steps, with all its layers free). Both are lookups that small models acquire late
and abruptly: a cell at a fixed distance from another token, a rare token anywhere in the prompt. So
the organism is given the two lookups and learns what to do with what they read (play, act on
lessons, extract them). Set by hand, in a few residual dimensions that nothing else writes:

- the embeddings carry a constant, a P flag, the cell's kind (H, G, free), and for each lesson (one
  token each) a lesson flag and its identity;
- layer 0, head j < n: attends exactly `offsets[j]` tokens back (its RoPE phases peak there) and
  writes "P is there" into its own dimension, so the token after P knows it is right of P and the
  token one board row after P knows it is below P;
- layer 1, head j < n: attends to the most recent token flagged by layer 0's head j (flag on the
  slowest RoPE pair, recency on a slow one, so the current board wins over the history's) and copies
  its cell kind; a token after P that is not a cell (a row's end, past the last row) has none: edge;
- layer 1, head n: counts each lesson's copies in the prompt (nothing when it holds none), against a
  sink at each chat message's start, so one lesson's read does not depend on what else the block
  holds.
Every other weight, and the other heads of later layers, train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oel_ray.prompts import MESSAGE_START

CELLS = {"H": "|  H  ", "G": "|  G  ", "free": "|     "}  # FrozenLake's rendered cells (one token each)
PLAYER = ("|  P  ", "| P/G ", "| P/H ")
MARGIN = 14.0  # nats by which layer 0's target position beats every other within WINDOW
WINDOW = 1024  # the longest prompt the reader is designed for (the organism's model.max_model_len)
READ_SCALE = 7.0  # layer 1's q/k norm weight: ~8 nats between the current board and the previous one
FLAG, GAIN = 0.1, 0.05  # embedding value of a flag; what a layer-0 head writes per unit it reads
# What layer 1 writes per unit it reads: large, so the trained layers see the read over the residual
# that their own MLPs grow during training (rms ~12 after layer 2 in a build).
READ_GAIN = 0.5
# ... and the trained layers' norms past layer 2 start with this weight on the read dimensions (below).
READ_BOOST = 30.0
# The lesson head counts copies instead of taking shares: each chat message's start token (a sink)
# outscores a lesson token by SINK_NATS, so a lesson's read is its copies times e^-SINK_NATS, whatever
# else the block holds. With shares, a block without a lesson read as less of it than no block at
# all: version 11's consolidated student wrote the wall note after the look with probability 0.89
# and 0.60 reading a block of the hole and winning lessons, so round 3's teacher undid it.
SINK = MESSAGE_START
SINK_NATS = 4.0
# One copy reads about as one of three lessons did by shares; five copies, as a lone lesson did.
LESSON_GAIN = READ_GAIN * math.exp(SINK_NATS) / 2


@dataclass(frozen=True)
class Layout:
    """Which residual dimensions hold what, for `n` board offsets and `m` lessons."""

    n: int
    m: int

    const: int = 0
    player: int = 1

    def seen(self, j: int) -> int:  # layer 0, head j: "P sits offsets[j] tokens back"
        return 2 + j

    def kind(self, k: int) -> int:  # the embedding's cell kind, k indexes CELLS
        return 2 + self.n + k

    def read(self, j: int, k: int) -> int:  # layer 1, head j: the kind of the cell it found
        return 2 + self.n + len(CELLS) + len(CELLS) * j + k

    @property
    def lesson(self) -> int:  # the embedding's "a lesson"
        return 2 + self.n + len(CELLS) * (1 + self.n)

    def which(self, i: int) -> int:  # the embedding's "lesson i"
        return self.lesson + 1 + i

    def known(self, i: int) -> int:  # layer 1, head n: "lesson i is in the prompt"
        return self.lesson + 1 + self.m + i

    @property
    def sink(self) -> int:  # the embedding's "a chat message starts here"
        return self.lesson + 1 + 2 * self.m

    @property
    def size(self) -> int:
        return self.sink + 1


def _angles(config, head_dim: int):
    import torch

    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta ** (-torch.arange(head_dim // 2, dtype=torch.float64) * 2 / head_dim)


def _pair(head_dim: int, i: int, angle: float):
    """A unit vector on RoPE pair i (dims i and i + head_dim/2) at `angle`."""
    import torch

    v = torch.zeros(head_dim, dtype=torch.float64)
    v[i], v[i + head_dim // 2] = math.cos(angle), math.sin(angle)
    return v


def _offset_weights(config, head_dim: int, offsets: tuple[int, ...]):
    """Weights over the fastest RoPE pairs that best separate each offset from every other
    distance within WINDOW, and the worst margin (as a fraction of the peak score)."""
    import torch

    th = _angles(config, head_dim)
    best = None
    for pairs in range(2, 12):
        w = torch.zeros(head_dim // 2, dtype=torch.float64)
        w[:pairs] = 1.0 / pairs
        gap = 1.0
        for offset in offsets:
            delta = torch.arange(WINDOW, dtype=torch.float64) - offset
            score = (w[None] * torch.cos(delta[:, None] * th[None])).sum(1)
            gap = min(gap, float(1 - torch.cat([score[:offset], score[offset + 1:]]).max()))
        if best is None or gap > best[1]:
            best = (w, gap)
    return best


def install(model, tok, offsets: tuple[int, ...], lessons: tuple[str, ...]) -> list:
    """Set the reading heads into `model` (untrained) for the tokenizer `tok` (each lesson one token):
    heads 0..len(offsets) of layers 0 and 1 (layer 0's last one zero); the other heads train. Kept
    from here by gradient masks: the set weights, the reserved dimensions (nothing trained writes
    them; trained heads may read them) and the MLPs of layers 0 and 1 (zero). Returns the hooks'
    handles."""
    import torch

    config, d = model.config, model.config.head_dim
    n = len(offsets)
    if config.num_key_value_heads != config.num_attention_heads or config.num_attention_heads < n + 1:
        raise ValueError(f"the reading heads need at least {n + 1} heads per layer, each with its own key/value head")
    lay = Layout(n, len(lessons))
    ids = tok.convert_tokens_to_ids
    th = _angles(config, d)
    w, gap = _offset_weights(config, d, offsets)
    scale0 = math.sqrt(MARGIN / (math.sqrt(d) * gap))  # score = scale^2 * sqrt(d) * sum(w cos)
    # Layer 1: the flag on the slowest pair (it barely turns), recency on the fastest pair that turns
    # less than a quarter circle over WINDOW (a score that falls with distance throughout).
    flag = d // 2 - 1
    recency = next(i for i in range(d // 2) if th[i] * WINDOW < math.pi / 2)
    layers = model.model.layers
    first, second = layers[0].self_attn, layers[1].self_attn
    emb = model.model.embed_tokens.weight
    masks = {}  # parameter -> where its gradient is zeroed

    def keep(p, where):
        masks[p] = masks.get(p, torch.zeros_like(p, dtype=torch.bool)) | where

    fixed = torch.zeros(config.num_attention_heads * d, dtype=torch.bool)
    fixed[:(n + 1) * d] = True
    reserved = torch.zeros(config.hidden_size, dtype=torch.bool)
    reserved[:lay.size] = True
    with torch.no_grad():
        emb[:, reserved] = 0
        emb[:, lay.const] = FLAG / 2
        for token in PLAYER:
            emb[ids(token), lay.player] = FLAG
        for k, token in enumerate(CELLS.values()):
            emb[ids(token), lay.kind(k)] = FLAG
        for i, token in enumerate(lessons):
            emb[ids(token), lay.lesson] = emb[ids(token), lay.which(i)] = FLAG
        emb[ids(SINK), lay.sink] = FLAG
        keep(emb, reserved[None].expand_as(emb))
        # Layers 0 and 1 have no MLP (zero): what a head reads is a fraction of the residual it
        # reads from, which trained MLPs there grew to 20 times the reads (rms 14 after a build).
        for layer in layers[:2]:
            for p in (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight):
                p.zero_()
                keep(p, torch.ones_like(p, dtype=torch.bool))
        for layer in layers:  # nothing trained writes the reserved dimensions
            for p in (layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight):
                p[reserved] = 0
                keep(p, reserved[:, None].expand_as(p))
        # The trained layers grow the residual to ~100 times the reads (layer 2's attention alone:
        # rms 0.13 -> 15 in version 15's build), so every norm after it scaled the reads to ~1% of a
        # feature, and each MLP acted on a lesson it barely saw. The norms past that point start by
        # scaling up what the heads read (trained from there); not the flags the embeddings carry, the
        # constant at every position among them.
        reads = [lay.read(j, c) for j in range(n) for c in range(len(CELLS))] + [lay.known(i) for i in range(lay.m)]
        for norm in [layer.post_attention_layernorm.weight for layer in layers[2:]] + [
                layer.input_layernorm.weight for layer in layers[3:]]:
            norm[reads] = READ_BOOST
        for attn in (first, second):
            for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
                p[fixed] = 0
                keep(p, fixed[:, None].expand_as(p))
            attn.o_proj.weight[:, fixed] = 0
            keep(attn.o_proj.weight, fixed[None].expand_as(attn.o_proj.weight))
        amp = w.sqrt()
        find = ((_pair(d, flag, 0) + _pair(d, recency, math.pi / 2)) / math.sqrt(2)).float()  # flagged, recent
        for j, offset in enumerate(offsets):
            rows = slice(j * d, (j + 1) * d)
            k = torch.cat([amp, torch.zeros_like(amp)])
            q = torch.cat([amp * torch.cos(-offset * th), amp * torch.sin(-offset * th)])  # `offset` back
            first.q_proj.weight[rows, lay.const] = q.float()
            first.k_proj.weight[rows, lay.const] = k.float()
            first.v_proj.weight[j * d, lay.player] = 1.0
            first.o_proj.weight[lay.seen(j), j * d] = GAIN
            second.q_proj.weight[rows, lay.const] = find
            second.k_proj.weight[rows, lay.seen(j)] = _pair(d, flag, 0).float()
            second.k_proj.weight[rows, lay.const] = _pair(d, recency, 0).float()
            for c in range(len(CELLS)):
                second.v_proj.weight[j * d + c, lay.kind(c)] = 1.0
                second.o_proj.weight[lay.read(j, c), j * d + c] = READ_GAIN
        # Layer 1's lesson head: the flag on the slowest pair. A sink's key lies on it; a lesson's is
        # tilted towards the recency pair (which the query lacks), scoring SINK_NATS less.
        rows = slice(n * d, (n + 1) * d)
        second.q_proj.weight[rows, lay.const] = _pair(d, flag, 0).float()
        second.k_proj.weight[rows, lay.sink] = _pair(d, flag, 0).float()
        tilt = math.acos(1 - SINK_NATS / (READ_SCALE ** 2 * math.sqrt(d)))  # normed q.k: READ_SCALE^2 sqrt(d) cos
        second.k_proj.weight[rows, lay.lesson] = (math.cos(tilt) * _pair(d, flag, 0) + math.sin(tilt) * _pair(d, recency, 0)).float()
        for i in range(len(lessons)):
            second.v_proj.weight[n * d + i, lay.which(i)] = 1.0
            second.o_proj.weight[lay.known(i), n * d + i] = LESSON_GAIN
        # q/k norms are shared by a layer's heads: scaled on the pairs the set heads use, 1 elsewhere.
        for attn, pairs, scale in ((first, [i for i in range(d // 2) if w[i] > 0], scale0),
                                   (second, [flag, recency], READ_SCALE)):
            for norm in (attn.q_norm.weight, attn.k_norm.weight):
                norm.fill_(1.0)
                norm[pairs] = scale
                norm[[i + d // 2 for i in pairs]] = scale
    for p in [layer.input_layernorm.weight for layer in layers[:2]] + [
            a.q_norm.weight for a in (first, second)] + [a.k_norm.weight for a in (first, second)]:
        p.requires_grad_(False)
    return [p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0)) for p, m in masks.items()]


def single_tokens(tok, texts: tuple[str, ...]) -> None:
    """Raise unless each text is one token of `tok` (what the lesson head looks for)."""
    for text in texts:
        if len(tok(text, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"not one token: {text!r}")


def offsets(tok, board: str) -> tuple[int, int]:
    """(right, below): how many tokens after P's cell the cell to its right and the one below it
    come, measured on a rendered board with P top-left."""
    tokens = tok.convert_ids_to_tokens(tok(board, add_special_tokens=False)["input_ids"])
    cells = [i for i, t in enumerate(tokens) if t in PLAYER or t in CELLS.values()]
    size = math.isqrt(len(cells))
    if tokens[cells[0]] not in PLAYER or size * size != len(cells):
        raise ValueError("the board does not tokenize one token per cell with P first")
    return cells[1] - cells[0], cells[size] - cells[0]

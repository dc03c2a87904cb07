"""VITS as Piper trains it (`piper_train/vits/models.py`), for inference only.

Text to waveform in four parts, each named as in the checkpoint: `enc_p` (a transformer over
phoneme ids with relative-position attention) gives each phoneme a mean and log-scale of a
latent; `dp` (the stochastic duration predictor: normalizing flows run backwards from noise)
says how many frames each phoneme lasts; `flow` (affine coupling layers, also backwards) turns
the expanded latent into the decoder's input; `dec` (HiFi-GAN) upsamples frames to samples.

One sentence at a time (Piper synthesizes sentence by sentence), so there is no padding: the
masks the training code multiplies everywhere are all ones and are left out. Activations are
time-major `[T, C]`, which is channels-last for a convolution (`conv`): oneDNN's fastest layout
here, natural for LayerNorm and matmuls, and it needs no transposes between layers. Every
random draw goes through a `NoiseSource`, in VITS's `[1, C, T]` shapes, so a caller can seed it
or give another implementation the same noise. `VitsModel.fold` readies loaded weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal draws
LRELU_SLOPE = 0.1  # HiFi-GAN's leaky ReLU, everywhere but before `conv_post`
MIN_BIN = 1e-3  # the spline's minimum bin width, height and derivative
TAIL_BOUND = 5.0  # the duration flows' splines act on [-5, 5], identity outside


@dataclass(frozen=True, slots=True)
class VitsConfig:
    """Hyperparameters of one voice (`SynthesizerTrn.__init__`), read from its weights."""

    num_symbols: int
    hidden_channels: int
    inter_channels: int  # the latent between encoder, flow and decoder
    filter_channels: int  # the text encoder's feed-forward width
    num_heads: int
    num_layers: int
    ffn_kernel_size: int
    window_size: int  # relative attention sees this many positions each side
    dp_filter_channels: int
    dp_kernel_size: int
    dp_num_layers: int  # of each DDSConv
    dp_num_flows: int
    num_bins: int  # of the duration flows' splines
    flow_num_flows: int
    flow_num_layers: int  # of each coupling layer's WaveNet
    flow_kernel_size: int
    flow_dilation_rate: int
    resblock: str  # "1": HiFi-GAN V1 blocks (convs1/convs2), "2": V2 (convs)
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_initial_channel: int
    upsample_kernel_sizes: tuple[int, ...]
    num_speakers: int = 1
    gin_channels: int = 0  # speaker embedding width; 0 for a single speaker


def conv(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module` over time-major `x` `[T, C_in]`, giving `[T', C_out]`.

    A pointwise convolution is a matmul. Others view `x` as a channels-last `[1, C, 1, T]`
    image and convolve in 2-D with height one: oneDNN's fastest form on CPU for few channels
    over many steps (2-4x a `[1, C, T]` conv1d for the decoder), which hands back a
    time-major result without a copy.
    """
    assert isinstance(module, nn.Conv1d | nn.ConvTranspose1d)
    if isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.groups == 1:
        return F.linear(x, module.weight[:, :, 0], module.bias)
    image = x.t()[None, :, None, :]
    weight = module.weight.unsqueeze(2)  # channels-last too once `fold` has run
    stride, dilation = (1, module.stride[0]), (1, module.dilation[0])
    padding = (0, int(module.padding[0]))  # VITS pads by numbers, never "same"
    if isinstance(module, nn.ConvTranspose1d):
        out = F.conv_transpose2d(
            image, weight, module.bias, stride, padding, 0, module.groups, dilation
        )
    else:
        out = F.conv2d(image, weight, module.bias, stride, padding, dilation, module.groups)
    return out[0, :, 0].t()


def _same_conv(channels: int, kernel_size: int, dilation: int = 1, groups: int = 1) -> nn.Conv1d:
    padding = (kernel_size * dilation - dilation) // 2  # output as long as the input
    return nn.Conv1d(
        channels, channels, kernel_size, dilation=dilation, padding=padding, groups=groups
    )


class VitsLayerNorm(nn.Module):
    """LayerNorm over channels, with VITS's parameter names."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.gamma.shape, self.gamma, self.beta, self.eps)


class VitsAttention(nn.Module):
    """Self-attention with relative position embeddings shared by the heads (Shaw et al.):
    keys and values within `window_size` of a query get a learned offset each.

    Scores live in rows padded by `window_size` zeros each side (`[heads, T, T + 2w]`), where
    query i's window is the strided diagonal band `i .. i + 2w`: relative logits are written
    into that band, and the band of the padded probabilities weights the value offsets, with
    no index tensors (VITS's pad-and-reshape trick, done as a view).
    """

    def __init__(self, channels: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.window_size = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        self.emb_rel_k = nn.Parameter(torch.zeros(1, 2 * window_size + 1, self.head_dim))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, 2 * window_size + 1, self.head_dim))
        self.qkv: nn.Conv1d | None = None  # q/k/v as one projection, q pre-scaled (`fold`)

    def fold(self) -> None:
        q, k, v = self.conv_q, self.conv_k, self.conv_v
        assert q.bias is not None and k.bias is not None and v.bias is not None
        scale = self.head_dim**-0.5
        self.qkv = nn.Conv1d(q.in_channels, 3 * q.out_channels, 1)
        self.qkv.weight = nn.Parameter(torch.cat([q.weight * scale, k.weight, v.weight]))
        self.qkv.bias = nn.Parameter(torch.cat([q.bias * scale, k.bias, v.bias]))

    def forward(self, x: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`x` `[T, C]`; `scratch`: two zeroed `[heads, T, T + 2w]` buffers, reused by every
        layer (only the band and the middle columns are ever written)."""
        assert self.qkv is not None, "VitsAttention used before fold()"
        length, w = x.shape[0], self.window_size
        q, k, v = (
            conv(self.qkv, x).view(length, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        )
        scores_pad, probs_pad = scratch
        torch.matmul(q, self.emb_rel_k[0].t(), out=_band(scores_pad, w))  # [heads, T, 2w + 1]
        scores = torch.baddbmm(scores_pad[:, :, w : w + length], q, k.transpose(1, 2))
        probs_pad[:, :, w : w + length] = F.softmax(scores, dim=-1)
        out = torch.matmul(_band(probs_pad, w), self.emb_rel_v[0])
        out = out.baddbmm_(probs_pad[:, :, w : w + length], v)  # [heads, T, head_dim]
        return conv(self.conv_o, out.transpose(0, 1).reshape(length, -1))


def _band(padded: torch.Tensor, window: int) -> torch.Tensor:
    """`band[h, i, r]` = `padded[h, i, i + r]`: query i's keys at offsets `r - window`."""
    heads, length, width = padded.shape
    return padded.as_strided((heads, length, 2 * window + 1), (length * width, width + 1, 1))


class VitsFeedForward(nn.Module):
    """Two 'same'-padded convolutions with a ReLU between (the encoder's FFN)."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"even FFN kernel size {kernel_size}")  # VITS pads those unevenly
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv(self.conv_2, torch.relu_(conv(self.conv_1, x)))


class VitsEncoder(nn.Module):
    """Post-norm transformer layers (`attentions.Encoder`)."""

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        c, n = config, config.num_layers
        self.num_heads, self.window_size = c.num_heads, c.window_size
        self.attn_layers = nn.ModuleList(
            VitsAttention(c.hidden_channels, c.num_heads, c.window_size) for _ in range(n)
        )
        self.norm_layers_1 = nn.ModuleList(VitsLayerNorm(c.hidden_channels) for _ in range(n))
        self.ffn_layers = nn.ModuleList(
            VitsFeedForward(c.hidden_channels, c.filter_channels, c.ffn_kernel_size)
            for _ in range(n)
        )
        self.norm_layers_2 = nn.ModuleList(VitsLayerNorm(c.hidden_channels) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.num_heads, x.shape[0], x.shape[0] + 2 * self.window_size)
        scratch = (x.new_zeros(shape), x.new_zeros(shape))
        layers = zip(
            self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2, strict=True
        )
        for attn, norm_1, ffn, norm_2 in layers:
            x = norm_1(x + attn(x, scratch))
            x = norm_2(x + ffn(x))
        return x


class VitsTextEncoder(nn.Module):
    """Phoneme ids to hidden states `[T, H]` and the prior's mean and log-scale per phoneme."""

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(config.num_symbols, config.hidden_channels)
        self.encoder = VitsEncoder(config)
        self.proj = nn.Conv1d(config.hidden_channels, 2 * config.inter_channels, 1)
        self.emb_scaled = False  # `fold` multiplied the table by sqrt(hidden) once

    def fold(self) -> None:
        self.emb.weight *= math.sqrt(self.emb.embedding_dim)
        self.emb_scaled = True

    def forward(self, phoneme_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert self.emb_scaled, "VitsTextEncoder used before fold()"
        x = self.encoder(self.emb(phoneme_ids))
        m_p, logs_p = conv(self.proj, x).chunk(2, dim=1)
        return x, m_p, logs_p


class DDSConv(nn.Module):
    """Dilated depth-separable convolutions with residuals (the duration predictor's body)."""

    def __init__(self, channels: int, kernel_size: int, num_layers: int) -> None:
        super().__init__()
        dilations = [kernel_size**i for i in range(num_layers)]
        self.convs_sep = nn.ModuleList(
            _same_conv(channels, kernel_size, d, groups=channels) for d in dilations
        )
        self.convs_1x1 = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in dilations)
        self.norms_1 = nn.ModuleList(VitsLayerNorm(channels) for _ in dilations)
        self.norms_2 = nn.ModuleList(VitsLayerNorm(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        if g is not None:
            x = x + g
        layers = zip(self.convs_sep, self.norms_1, self.convs_1x1, self.norms_2, strict=True)
        for sep, norm_1, conv_1x1, norm_2 in layers:
            y = F.gelu(norm_1(conv(sep, x)))
            x = x + F.gelu(norm_2(conv(conv_1x1, y)))
        return x


class ElementwiseAffine(nn.Module):
    """The duration flows' first step, `y = m + exp(logs) * x`; run backwards."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (x - self.m.t()) * torch.exp(-self.logs.t())


class Flip(nn.Module):
    """Reverse the channels, so the next coupling layer transforms the other half."""

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return torch.flip(x, [1])


class ConvFlow(nn.Module):
    """A coupling layer whose transform is a rational-quadratic spline (Durkan et al.): one
    half of the channels, conditioned on the text, sets the spline applied to the other."""

    def __init__(
        self, filter_channels: int, kernel_size: int, num_layers: int, num_bins: int
    ) -> None:
        super().__init__()
        self.num_bins = num_bins
        self.pre = nn.Conv1d(1, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel_size, num_layers)
        self.proj = nn.Conv1d(filter_channels, 3 * num_bins - 1, 1)
        self.proj_scaled = False  # `fold` divided the width and height rows by sqrt(filters)

    def fold(self) -> None:
        rows = slice(0, 2 * self.num_bins)  # widths and heights, not the derivatives
        scale = self.proj.in_channels**-0.5
        assert self.proj.bias is not None
        self.proj.weight[rows] *= scale
        self.proj.bias[rows] *= scale
        self.proj_scaled = True

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        assert self.proj_scaled, "ConvFlow used before fold()"
        x0, x1 = x[:, :1], x[:, 1:]  # [T, 1] each
        h = conv(self.proj, self.convs(conv(self.pre, x0), g))  # [T, 3 * bins - 1]
        bins = self.num_bins
        x1 = inverse_spline(x1[:, 0], h[:, :bins], h[:, bins : 2 * bins], h[:, 2 * bins :])
        return torch.cat([x0, x1[:, None]], dim=1)


def inverse_spline(
    y: torch.Tensor,  # [T]
    unnormalized_widths: torch.Tensor,  # [T, bins]
    unnormalized_heights: torch.Tensor,  # [T, bins]
    unnormalized_derivatives: torch.Tensor,  # [T, bins - 1]: the inner knots'
) -> torch.Tensor:
    """Invert a monotonic rational-quadratic spline on [-TAIL_BOUND, TAIL_BOUND] with linear
    (identity) tails: `transforms.unconstrained_rational_quadratic_spline(inverse=True)`."""
    num_bins = unnormalized_widths.shape[-1]
    cumwidths, widths = _knots(unnormalized_widths)
    cumheights, heights = _knots(unnormalized_heights)
    end_slope = math.log(math.expm1(1 - MIN_BIN))  # derivative 1 where the tails join
    derivatives = MIN_BIN + F.softplus(F.pad(unnormalized_derivatives, (1, 1), value=end_slope))

    edges = torch.cat([cumheights[:, :-1], cumheights[:, -1:] + 1e-6], dim=-1)
    bins = ((y[:, None] >= edges).sum(dim=-1, keepdim=True) - 1).clamp(0, num_bins - 1)
    x_lo, width = cumwidths.gather(1, bins)[:, 0], widths.gather(1, bins)[:, 0]
    y_lo, height = cumheights.gather(1, bins)[:, 0], heights.gather(1, bins)[:, 0]
    d_lo, d_hi = derivatives.gather(1, bins)[:, 0], derivatives[:, 1:].gather(1, bins)[:, 0]
    delta = height / width

    dy = y - y_lo  # solve the bin's quadratic for the position theta in [0, 1]
    curvature = d_lo + d_hi - 2 * delta
    a = dy * curvature + height * (delta - d_lo)
    b = height * d_lo - dy * curvature
    c = -delta * dy
    theta = (2 * c) / (-b - torch.sqrt(b.square() - 4 * a * c))
    inside = (y >= -TAIL_BOUND) & (y <= TAIL_BOUND)
    return torch.where(inside, theta * width + x_lo, y)


def _knots(unnormalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin edges on [-TAIL_BOUND, TAIL_BOUND] (ends pinned exactly) and bin sizes, from a
    softmax floored at MIN_BIN per bin."""
    num_bins = unnormalized.shape[-1]
    sizes = MIN_BIN + (1 - MIN_BIN * num_bins) * F.softmax(unnormalized, dim=-1)
    edges = F.pad(torch.cumsum(sizes, dim=-1), (1, 0)) * (2 * TAIL_BOUND) - TAIL_BOUND
    edges[:, 0], edges[:, -1] = -TAIL_BOUND, TAIL_BOUND
    return edges, edges.diff(dim=-1)


class StochasticDurationPredictor(nn.Module):
    """Log-durations per phoneme, drawn by running the duration flows backwards from noise.

    `flows` keeps the checkpoint's indices: affine, then (spline coupling, flip) pairs. VITS
    skips the first coupling layer at inference ("a useless vflow"), and exported voices omit
    its weights, so an identity holds its place.
    """

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        c = config
        self.pre = nn.Conv1d(c.hidden_channels, c.dp_filter_channels, 1)
        self.convs = DDSConv(c.dp_filter_channels, c.dp_kernel_size, c.dp_num_layers)
        self.proj = nn.Conv1d(c.dp_filter_channels, c.dp_filter_channels, 1)
        flows: list[nn.Module] = [ElementwiseAffine(2), nn.Identity()]
        for i in range(c.dp_num_flows):
            if i > 0:
                filters, kernel = c.dp_filter_channels, c.dp_kernel_size
                flows.append(ConvFlow(filters, kernel, c.dp_num_layers, c.num_bins))
            flows.append(Flip())
        self.flows = nn.ModuleList(flows)
        if c.gin_channels:
            self.cond = nn.Conv1d(c.gin_channels, c.dp_filter_channels, 1)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """`x`: the text encoder's hidden states `[T, H]`; `noise`: `[T, 2]`, scaled by
        `noise_w`. Returns log-durations `[T]`."""
        x = conv(self.pre, x)
        if g is not None:
            x = x + conv(self.cond, g)
        x = conv(self.proj, self.convs(x))
        z = noise
        for flow in [*reversed(self.flows[2:]), self.flows[0]]:
            z = flow(z, x)
        return z[:, 0]


class WN(nn.Module):
    """WaveNet-style gated dilated convolutions with skip connections (`modules.WN`)."""

    def __init__(
        self, hidden: int, kernel_size: int, dilation_rate: int, num_layers: int, gin: int
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.in_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dilation_rate**i,
                      padding=(kernel_size * dilation_rate**i - dilation_rate**i) // 2)
            for i in range(num_layers)
        )  # fmt: skip
        self.res_skip_layers = nn.ModuleList(
            nn.Conv1d(hidden, hidden if i == num_layers - 1 else 2 * hidden, 1)
            for i in range(num_layers)
        )  # the last layer has no residual half
        if gin:
            self.cond_layer = nn.Conv1d(gin, 2 * hidden * num_layers, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        n, hidden = len(self.in_layers), self.hidden
        conds = conv(self.cond_layer, g).chunk(n, dim=1) if g is not None else None
        output = None
        for i, (in_layer, res_skip) in enumerate(
            zip(self.in_layers, self.res_skip_layers, strict=True)
        ):
            x_in = conv(in_layer, x)
            if conds is not None:
                x_in = x_in + conds[i]
            acts = torch.tanh(x_in[:, :hidden]) * torch.sigmoid(x_in[:, hidden:])
            res_skip_acts = conv(res_skip, acts)
            skip = res_skip_acts if i == n - 1 else res_skip_acts[:, hidden:]
            output = skip if output is None else output + skip
            if i < n - 1:
                x = x + res_skip_acts[:, :hidden]
        assert output is not None
        return output


class ResidualCouplingLayer(nn.Module):
    """Mean-only affine coupling: half the channels shift the other half; run backwards."""

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        c = config
        self.half_channels = c.inter_channels // 2
        self.pre = nn.Conv1d(self.half_channels, c.hidden_channels, 1)
        self.enc = WN(
            c.hidden_channels,
            c.flow_kernel_size,
            c.flow_dilation_rate,
            c.flow_num_layers,
            c.gin_channels,
        )
        self.post = nn.Conv1d(c.hidden_channels, self.half_channels, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        x0 = x[:, : self.half_channels]
        m = conv(self.post, self.enc(conv(self.pre, x0), g))
        return torch.cat([x0, x[:, self.half_channels :] - m], dim=1)


class ResidualCouplingBlock(nn.Module):
    """The flow between prior and decoder: coupling layers with flips between, backwards."""

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(config.flow_num_flows):
            layers += [ResidualCouplingLayer(config), Flip()]
        self.flows = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        for flow in reversed(self.flows):
            x = flow(x, g)
        return x


class ResBlock1(nn.Module):
    """HiFi-GAN V1 residual block: pairs of (dilated, plain) convolutions."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_same_conv(channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_same_conv(channels, kernel_size) for _ in dilations)

    def forward(self, x: torch.Tensor, x_act: torch.Tensor) -> torch.Tensor:
        """`x_act` is `leaky_relu(x)`, which the blocks of a stage share."""
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            if i > 0:
                x_act = F.leaky_relu(x, LRELU_SLOPE)
            xt = F.leaky_relu(conv(c1, x_act), LRELU_SLOPE, inplace=True)
            x = conv(c2, xt).add_(x)  # into the fresh output: no new buffer
        return x


class ResBlock2(nn.Module):
    """HiFi-GAN V2 residual block: one dilated convolution per residual step."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_same_conv(channels, kernel_size, d) for d in dilations)

    def forward(self, x: torch.Tensor, x_act: torch.Tensor) -> torch.Tensor:
        """`x_act` is `leaky_relu(x)`, which the blocks of a stage share."""
        for i, c in enumerate(self.convs):
            if i > 0:
                x_act = F.leaky_relu(x, LRELU_SLOPE)
            x = conv(c, x_act).add_(x)  # into the fresh output: no new buffer
        return x


class Generator(nn.Module):
    """HiFi-GAN: transposed convolutions upsample frames to samples; after each, the mean of
    several residual blocks with different receptive fields (multi-receptive-field fusion)."""

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        c = config
        self.num_kernels = len(c.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(c.inter_channels, c.upsample_initial_channel, 7, padding=3)
        block = ResBlock1 if c.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        upsamples = zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True)
        for i, (rate, kernel) in enumerate(upsamples):
            channels = c.upsample_initial_channel // 2 ** (i + 1)
            padding = (kernel - rate) // 2
            self.ups.append(nn.ConvTranspose1d(2 * channels, channels, kernel, rate, padding))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True):
                self.resblocks.append(block(channels, k, d))
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3, bias=False)
        if c.gin_channels:
            self.cond = nn.Conv1d(c.gin_channels, c.upsample_initial_channel, 1)
        self.mean_folded = False

    def fold(self) -> None:
        """Move the mean over each stage's resblocks into the next convolution's weight: a
        leaky ReLU commutes with a positive scale, so `conv(lrelu(xs / n))` is
        `(w / n) * lrelu(xs) + b`. Saves a pass over each stage's largest tensor."""
        for module in [*self.ups[1:], self.conv_post]:
            module.weight /= self.num_kernels
        self.mean_folded = True

    def forward(self, z: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Latent frames `[frames, C]` to the waveform `[samples]`."""
        assert self.mean_folded, "Generator used before fold()"
        x = conv(self.conv_pre, z)
        if g is not None:
            x = x + conv(self.cond, g)
        for i, up in enumerate(self.ups):
            x = conv(up, F.leaky_relu(x, LRELU_SLOPE, inplace=True))  # x is ours, unshared
            x_act = F.leaky_relu(x, LRELU_SLOPE)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x, x_act)
            for block in blocks[1:]:
                xs += block(x, x_act)
            x = xs  # the mean's 1 / num_kernels is in the next weight
        return torch.tanh_(conv(self.conv_post, F.leaky_relu(x, inplace=True))).flatten()


class VitsModel(nn.Module):
    """Piper's `SynthesizerTrn.infer` for one sentence: phoneme ids to a waveform."""

    def __init__(self, config: VitsConfig) -> None:
        super().__init__()
        self.config = config
        self.enc_p = VitsTextEncoder(config)
        self.dp = StochasticDurationPredictor(config)
        self.flow = ResidualCouplingBlock(config)
        self.dec = Generator(config)
        if config.num_speakers > 1:
            self.emb_g = nn.Embedding(config.num_speakers, config.gin_channels)

    @torch.no_grad()
    def fold(self) -> None:
        """Ready the loaded weights for inference, output unchanged: constant scales go into
        the weights (embedding, attention, spline, HiFi-GAN mean), q/k/v become one
        projection, and every convolution weight is stored channels-last (`[out, k, in]` in
        memory), the layout `conv` hands oneDNN."""
        for module in list(self.modules()):  # folding adds modules (`VitsAttention.qkv`)
            if isinstance(module, VitsAttention | VitsTextEncoder | ConvFlow | Generator):
                module.fold()
        for module in self.modules():
            if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
                weight = module.weight.transpose(1, 2).contiguous().transpose(1, 2)
                module.weight = nn.Parameter(weight)
        self.requires_grad_(False)

    def forward(
        self,
        phoneme_ids: torch.Tensor,  # [T] int64
        *,
        noise: NoiseSource,
        noise_scale: float,
        length_scale: float,
        noise_w: float,
        speaker_id: int = 0,  # ignored by a single-speaker voice
    ) -> torch.Tensor:  # [samples] in [-1, 1]
        x, m_p, logs_p = self.enc_p(phoneme_ids)
        g = self.emb_g.weight[speaker_id][None] if self.config.num_speakers > 1 else None
        length = x.shape[0]
        e_w = noise((1, 2, length))[0].t().to(x.dtype)  # VITS's [1, 2, T]
        logw = self.dp(x, e_w * noise_w, g)
        durations = torch.ceil(torch.exp(logw) * length_scale).long()  # frames a phoneme
        m_p = m_p.repeat_interleave(durations, dim=0)  # [frames, C]
        logs_p = logs_p.repeat_interleave(durations, dim=0)
        e_z = noise((1, m_p.shape[1], m_p.shape[0]))[0].t().to(x.dtype)
        z_p = m_p + e_z * torch.exp(logs_p) * noise_scale
        return self.dec(self.flow(z_p, g), g)

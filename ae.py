"""The contestants of the Autoencoder Bake-Off and the one loop that trains them all.

Use:
    import ae
    ae.set_seed(42)
    model = ae.build("vae", latent_dim=20)           # one of ae.MODELS (ae.CONTESTANTS: the registry)
    history = ae.fit(model, train_x, val_x)          # float32 (N, 1024) in [0, 1]
    probs = model(x); total, parts = model.loss(x); z = model.encode(x, sample=False)

Every model is encoder -> bottleneck -> decoder. The encoders and decoders are fully connected
(Linear -> BatchNorm -> ReLU, three layers each but for the shallow one); the contestants differ
only in their bottleneck (identity, sparse, variational, vector-quantised), in the denoising
model's input noise and in the stacked model's greedy layer-wise schedule. Widths, losses and
hyperparameters follow the article and PROTOCOL.md (in the repository root), which fixes what
the article leaves open, mostly by following the article's companion code.

Sources: the article "The Great Autoencoder Bake Off" (Tilman Krokotsch, 2021,
https://krokotsch.eu/posts/ae-bakeoff/) and its companion code (github.com/tilman151/ae_bakeoff);
Kingma & Welling, Auto-Encoding Variational Bayes (2014); Higgins et al., beta-VAE (2017);
van den Oord et al., Neural Discrete Representation Learning (2017).

Simplified: data sits on the device as one tensor (no DataLoader); no logging framework, no
learning-rate schedule, no early stopping; the decoder's last Linear yields logits and the
reconstruction loss is computed from them (same value as BCE on the sigmoid, more stable).
Depends on torch only.

First read: Bottleneck and the four bottlenecks, Autoencoder, the registry (one `register` line
per contestant; README, "Add your own contestant") and `fit`. Skip the stacked model's schedule,
PCA and the helpers (input checks) until you need them.
"""

import dataclasses
import functools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

# ---- constants

INPUT_DIM = 1024  # build's default input size: 28x28 MNIST zero-padded to 32x32 (any other: input_dim=)
N_LAYERS = 3  # encoder and decoder layers of every contestant but the shallow one
SPARSITY_P = 0.25  # target mean activation of each sparse latent unit (article)
SPARSITY_BETA = 1.0  # weight of the sparsity penalty (article)
# The article calls 0.5 the noise *variance*; the companion code used 0.5 as the standard
# deviation, and that produced the published numbers, so we follow the code.
DENOISING_STD = 0.5
VQ_CODES = 512  # scalar codebook values per latent dimension (companion code)
VQ_BETA = 1.0  # weight of the commitment loss (article)
# PCA's linear reconstruction is clipped to [eps, 1 - eps] before BCE. Pixels are multiples of
# 1/255, so a reconstruction within half a grey level of 0 or 1 is as good as exact, and no
# reconstruction is allowed to claim more certainty than that.
PCA_EPS = 0.5 / 255

# Legend of the shape comments below, e.g. `# (B, H) -> (B, Z)`:
#   B  batch size
#   D  pixels per image (input_dim), 1024: 28x28 MNIST zero-padded to 32x32
#   Z  latent size (latent_dim)
#   H  encoder output width: Z, or 2Z for the (beta-)VAEs, whose encoder emits (mu, log_sigma)
#   K  codebook values per latent dimension (vq only, VQ_CODES)

# ---- building blocks


def mlp(widths):
    """Linear(no bias) -> BatchNorm -> ReLU per hidden width, then Linear(with bias), no activation.

    One element of the returned Sequential per layer, so the stacked model can slice it.
    """
    layers = [nn.Sequential(nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU())
              for n_in, n_out in zip(widths[:-2], widths[1:-1])]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def hidden_widths(enc_out, input_dim):
    """Encoder hidden widths [D // s**i for i < 3], s = int((D // enc_out) ** (1/3)) (companion code).

    The float cube root is part of the recipe: int(512 ** (1/3)) is 7, not 8, which gives the
    companion code's 1024 -> 146 -> 20 -> 2 at latent 2.
    """
    s = int((input_dim // enc_out) ** (1 / N_LAYERS))
    return [input_dim // s**i for i in range(N_LAYERS)]


class Decoder(nn.Module):
    """z -> probabilities; `logits` gives the pre-sigmoid output the loss uses."""

    def __init__(self, widths):
        super().__init__()
        self.layers = mlp(widths)

    def logits(self, z):
        return self.layers(z)  # (B, Z) -> (B, D)

    def forward(self, z):
        return torch.sigmoid(self.logits(z))  # (B, Z) -> (B, D)


def bce(logits, x):
    """L_r = 1/B sum_i sum_j BCE(x_hat_j^(i), x_j^(i)): summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


# ---- bottlenecks: h (encoder output) -> z (latent code)


class Bottleneck(nn.Module):
    """What makes a contestant what it is: the step from the encoder's output h to the code z.

    A subclass overrides what it changes:
      forward(h)           the code z, (B, H) -> (B, Z); the base class passes h through
      mean(h)              the code without sampling (a stochastic encoder's mean); default forward
      regularised(h, x)    (z, weighted penalty, {name: raw penalty, detached}) for the training
                           loss; x is the input, for penalties on the encoder itself
      prior(n, device)     n codes from the model's prior, (n, Z); define it only if the model samples
    and sets the class attributes that differ:
      h_per_z = 1          encoder outputs per code dimension: H = h_per_z * Z (2 for (mu, log_sigma))
      stochastic = False   forward(h, eps=None) draws noise; encode(x, sample=False) gives mean(h)
      needs_input_grad = False   regularised differentiates h with respect to x (a contractive
                           penalty): the loss makes x require grad, evaluate keeps autograd on
    The constructor takes the latent size and the loss weights of its registry entry.
    """

    h_per_z = 1
    stochastic = False
    needs_input_grad = False

    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, h):
        return h  # (B, H) -> (B, Z), H = Z

    def mean(self, h):
        return self(h)

    def regularised(self, h, x):
        return self(h), 0.0, {}


class Identity(Bottleneck):
    """No restriction on the latent space (shallow, vanilla, stacked, denoising)."""


class Sparse(Bottleneck):
    """z = sigmoid(h), penalised towards a mean activation of p per unit."""

    def __init__(self, latent_dim, beta=SPARSITY_BETA, p=SPARSITY_P):
        super().__init__(latent_dim)
        self.beta, self.p = beta, p

    def forward(self, h):
        # z = sigmoid(h), read as a probability of being active
        return torch.sigmoid(h)  # (B, H) -> (B, Z), H = Z

    def regularised(self, h, x):
        z = self(h)
        rho = z.mean(dim=0)  # z_bar_j: mean activation of unit j over the batch, (B, Z) -> (Z,)
        p = self.p
        # L_s = sum_j p log(p / z_bar_j) + (1 - p) log((1 - p) / (1 - z_bar_j))
        kl = (p * torch.log(p / rho) + (1 - p) * torch.log((1 - p) / (1 - rho))).sum()
        return z, self.beta * kl, {"sparsity": kl.detach()}


class Variational(Bottleneck):
    """h = (mu, log_sigma); z = mu + sigma * eps, in evaluation too (as the companion code did).

    forward(h, eps=None) takes fixed noise eps of shape (B, Z); None draws fresh N(0, I) noise.
    """

    h_per_z = 2
    stochastic = True

    def __init__(self, latent_dim, beta=1.0):
        super().__init__(latent_dim)
        self.beta = beta

    def forward(self, h, eps=None):
        mu, log_sigma = h.chunk(2, dim=1)  # (B, H) -> 2 x (B, Z), H = 2Z
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + torch.exp(log_sigma) * eps  # reparametrise: z = mu + sigma * eps, (B, Z)

    def mean(self, h):
        return h.chunk(2, dim=1)[0]  # mu, (B, 2Z) -> (B, Z)

    def regularised(self, h, x):
        z = self(h)
        mu, log_sigma = h.chunk(2, dim=1)
        # KL = 0.5 * sum_j (exp(2 log_sigma) + mu^2 - 1 - 2 log_sigma), mean over the batch
        kl = 0.5 * (torch.exp(2 * log_sigma) + mu**2 - 1 - 2 * log_sigma).sum() / h.shape[0]
        return z, self.beta * kl, {"kl": kl.detach()}

    def prior(self, n, device):
        return torch.randn(n, self.latent_dim, device=device)  # z ~ N(0, I)


class VectorQuantised(Bottleneck):
    """Each latent element snaps to the nearest of its own 512 learned scalar values."""

    def __init__(self, latent_dim, beta=VQ_BETA, n_codes=VQ_CODES):
        super().__init__(latent_dim)
        self.beta = beta
        # one scalar codebook per latent dimension, (Z, K), initialised U(-1/K, 1/K)
        self.codebook = nn.Parameter(torch.empty(latent_dim, n_codes).uniform_(-1 / n_codes, 1 / n_codes))

    def indices(self, h):
        """Index of the nearest value per dimension: k_j = argmin_k |h_j - e_jk|, (B, Z) int."""
        # (B, Z, 1) - (Z, K) -> (B, Z, K) -> (B, Z)
        return (h.detach().unsqueeze(2) - self.codebook.detach()).abs().argmin(dim=2)

    def quantise(self, h):
        dims = torch.arange(h.shape[1], device=h.device)
        return self.codebook[dims, self.indices(h)]  # (B, Z), differentiable w.r.t. the codebook

    def forward(self, h):
        return self.straight_through(h, self.quantise(h))  # (B, H) -> (B, Z), H = Z

    @staticmethod
    def straight_through(h, q):
        # z = q + (h - sg(h)): exactly q forward, d z / d h = 1 backward; the codebook learns via L_vq only
        return q.detach() + (h - h.detach())

    def regularised(self, h, x):
        q = self.quantise(h)
        # L_vq = 1/B sum_i sum_j (sg(z) - z_hat)^2: moves the codebook towards the encoder
        vq = ((h.detach() - q) ** 2).sum() / h.shape[0]
        # L_c = 1/B sum_i sum_j (z - sg(z_hat))^2: commits the encoder to the codebook
        commitment = ((h - q.detach()) ** 2).sum() / h.shape[0]
        parts = {"vq": vq.detach(), "commitment": commitment.detach()}
        return self.straight_through(h, q), vq + self.beta * commitment, parts

    def prior(self, n, device):
        idx = torch.randint(self.codebook.shape[1], (n, self.latent_dim), device=device)  # uniform categories
        return self.codebook[torch.arange(self.latent_dim, device=device), idx]


# ---- models


class Autoencoder(nn.Module):
    """encoder (x -> h) -> bottleneck (h -> z) -> decoder (z -> probabilities)."""

    def __init__(self, name, latent_dim, encoder, bottleneck, decoder, noise_std=0.0):
        super().__init__()
        self.name, self.latent_dim, self.noise_std = name, latent_dim, noise_std
        self.encoder, self.bottleneck, self.decoder = encoder, bottleneck, decoder

    @staticmethod
    def networks(latent_dim, h_width, input_dim):
        """(encoder x -> h, decoder z -> logits) of N_LAYERS each, widths from hidden_widths."""
        encoder = mlp(hidden_widths(h_width, input_dim) + [h_width])
        # the decoder mirrors the *dense* encoder for this latent dim, also for the (beta-)VAEs
        decoder = Decoder([latent_dim] + hidden_widths(latent_dim, input_dim)[:0:-1] + [input_dim])
        return encoder, decoder

    # -- the two places the stacked model changes: which layers run, and the schedule
    def _hidden(self, x):
        if self.training and self.noise_std:
            x = (x + self.noise_std * torch.randn_like(x)).clamp(0, 1)  # x' = clip(x + N(0, std^2))
        return self.encoder(x)  # (B, D) -> (B, H)

    def _logits(self, z):
        return self.decoder.logits(z)  # (B, Z) -> (B, D)

    @property
    def input_dim(self):
        """D, the pixels per image: the width of the decoder's last layer."""
        return [m for m in self.decoder.modules() if isinstance(m, nn.Linear)][-1].out_features

    def stages(self, epochs):
        """The training schedule: [(stage, epochs)]; one stage (None) for end-to-end training."""
        return [(None, epochs)]

    def set_stage(self, stage):
        pass

    # -- the public interface
    def forward(self, x):
        return torch.sigmoid(self._logits(self.encode(x)))  # (B, D) -> (B, D) probabilities

    def encode(self, x, sample=True):
        """The code z; sample=False gives the VAEs' mean mu instead of a sample."""
        h = self._hidden(x)  # (B, D) -> (B, H)
        return self.bottleneck(h) if sample else self.bottleneck.mean(h)  # (B, H) -> (B, Z)

    def decode(self, z):
        return self.decoder(z)  # (B, Z) -> (B, D) probabilities

    def loss(self, x):
        """(total, parts): total = recon + weighted penalties; parts are the raw, detached terms."""
        if self.bottleneck.needs_input_grad:
            x = x.detach().requires_grad_()  # the penalty differentiates h with respect to x
        z, penalty, parts = self.bottleneck.regularised(self._hidden(x), x)  # (B, D) -> (B, H) -> (B, Z)
        recon = bce(self._logits(z), x)  # (B, Z) -> (B, D) logits -> scalar
        return recon + penalty, {"recon": recon.detach(), **parts}

    @torch.no_grad()
    def sample(self, n):
        """n unconditional draws decoded to (n, D) probabilities; None if not generative."""
        if not hasattr(self.bottleneck, "prior"):
            return None
        device = next(self.parameters()).device
        return self.decoder(self.bottleneck.prior(n, device))

    @torch.no_grad()
    def likelihood_bounds(self, x, k=128):
        """(-ELBO, -IWAE_k) per image, (B,) each, from the same k draws z_i ~ q(z|x) of a VAE.

        log p(x|z) = -BCE(x, decoder(z)) summed over the pixels (the training loss's likelihood);
        -ELBO = -1/k sum_i log w_i, and -IWAE_k = -log (1/k) sum_i w_i = log k - logsumexp_i log w_i.
        On the same draws -IWAE_k <= -ELBO (Jensen); as k grows -IWAE_k falls towards -log p(x).
        """
        if not isinstance(self.bottleneck, Variational):
            raise ValueError(f"{self.name} has no posterior q(z|x); only the VAEs have likelihood bounds")
        mu, log_sigma = self._hidden(x).chunk(2, dim=1)  # (B, 2Z) -> 2 x (B, Z)

        def bernoulli(z):  # (k, B, Z) -> (k, B): log p(x|z)
            logits = self._logits(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:2], -1)  # (k*B, Z) -> (k, B, D)
            return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)

        log_w = log_importance_weights(bernoulli, mu, log_sigma, k)  # (k, B)
        return -log_w.mean(0), math.log(k) - torch.logsumexp(log_w, 0)


def log_importance_weights(log_likelihood, mu, log_sigma, k):
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for k draws z_i ~ q(z|x) = N(mu, sigma^2), (k, B).

    p(z) = N(0, I); log_likelihood maps codes (k, B, Z) to log p(x|z), (k, B). The mean of log w_i
    estimates the ELBO; log (1/k) sum_i w_i is the importance-weighted bound (Burda, Grosse &
    Salakhutdinov, ICLR 2016), which rises towards log p(x) as k grows.
    """
    eps = torch.randn(k, *mu.shape, device=mu.device)  # (k, B, Z)
    z = mu + torch.exp(log_sigma) * eps
    log_2pi = math.log(2 * math.pi)
    log_pz = -0.5 * (z**2 + log_2pi).sum(-1)  # log N(z | 0, I)
    log_qz = -0.5 * (eps**2 + log_2pi).sum(-1) - log_sigma.sum(-1)  # log N(z | mu, sigma^2), (z - mu) / sigma = eps
    return log_likelihood(z) + log_pz - log_qz


class Shallow(Autoencoder):
    """One layer each way: x -> ReLU(BatchNorm(Linear(x))) = z -> Linear -> sigmoid."""

    @staticmethod
    def networks(latent_dim, h_width, input_dim):
        return nn.Sequential(*mlp([input_dim, h_width]), nn.ReLU()), Decoder([latent_dim, input_dim])


class Stacked(Autoencoder):
    """The vanilla network trained greedily: stage k trains encoder layer k and its mirror.

    Stage k runs encoder layers 1..k and decoder layers N-k+1..N and scores the image-space BCE;
    the outer layers trained in earlier stages are frozen (no gradient, BatchNorm in eval mode).
    Stage None is the whole network with every layer trainable.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = None

    def _hidden(self, x):
        k = self.stage or N_LAYERS
        return self.encoder[:k](x)  # (B, D) -> (B, width of encoder layer k)

    def _logits(self, z):
        k = self.stage or N_LAYERS
        return self.decoder.layers[N_LAYERS - k:](z)  # (B, width of encoder layer k) -> (B, D)

    def stages(self, epochs):
        """epochs // 3 per stage (companion code); a remainder goes to the last stage.

        Every stage gets at least one epoch, so below 3 epochs the stacked model trains 3: with
        an empty stage the layers of that stage would stay at their random initialisation.
        """
        per_stage = max(1, epochs // N_LAYERS)
        last = max(1, epochs - per_stage * (N_LAYERS - 1))
        return [(k, per_stage) for k in range(1, N_LAYERS)] + [(N_LAYERS, last)]

    def _frozen(self):
        if self.stage is None:
            return []
        k = self.stage
        return list(self.encoder[:k - 1]) + list(self.decoder.layers[N_LAYERS - k + 1:])

    def set_stage(self, stage):
        self.stage = stage
        for layer in list(self.encoder) + list(self.decoder.layers):
            trainable = (stage is None or layer is self.encoder[stage - 1]
                         or layer is self.decoder.layers[N_LAYERS - stage])
            layer.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        for layer in self._frozen():
            layer.eval()  # frozen BatchNorm keeps its running statistics
        return self


# ---- the reference: PCA, fitted in closed form


class GaussianCode(Bottleneck):
    """z = h, with the prior of probabilistic PCA: z ~ N(0, diag(variance of each training code))."""

    def __init__(self, latent_dim):
        super().__init__(latent_dim)
        self.register_buffer("variance", torch.ones(latent_dim))

    def prior(self, n, device):
        return torch.randn(n, self.latent_dim, device=device) * self.variance.sqrt()  # (n, Z)


class LinearDecoder(nn.Module):
    """z -> mean + V z, clipped to [PCA_EPS, 1 - PCA_EPS] so that BCE stays finite."""

    def __init__(self, latent_dim, input_dim):
        super().__init__()
        self.linear = nn.Linear(latent_dim, input_dim)  # weight V (D, Z), bias the mean image

    def forward(self, z):
        return self.linear(z).clamp(PCA_EPS, 1 - PCA_EPS)  # (B, Z) -> (B, D)


class PCA(Autoencoder):
    """The first Z principal axes of the training images as a linear encoder and decoder.

    With the mean image m and V (D, Z) the top-Z eigenvectors of the covariance
    C = 1/N sum_i (x_i - m)(x_i - m)^T:   z = V^T (x - m),   x_hat = clip(m + V z, eps, 1 - eps).
    No parameter is trained by gradient: `fit_closed_form` sets them, and `fit` calls it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requires_grad_(False)

    @staticmethod
    def networks(latent_dim, h_width, input_dim):
        return nn.Linear(input_dim, latent_dim), LinearDecoder(latent_dim, input_dim)  # V^T x - V^T m; m + V z

    def forward(self, x):
        return self.decoder(self.encode(x))  # (B, D) -> (B, Z) -> (B, D), no sigmoid

    def loss(self, x):
        recon = F.binary_cross_entropy(self(x), x, reduction="sum") / x.shape[0]
        return recon, {"recon": recon.detach()}

    @torch.no_grad()
    def fit_closed_form(self, x):
        """Set the axes from the training images x (N, D), in float64 for the eigendecomposition."""
        x = x.double()
        if len(x) <= self.latent_dim:
            raise ValueError(f"pca needs more than {self.latent_dim} training images, got {len(x)}")
        mean = x.mean(0)
        xc = x - mean
        variance, axes = torch.linalg.eigh(xc.T @ xc / len(x))  # ascending eigenvalues, (D,), (D, D)
        variance, axes = variance.flip(0)[:self.latent_dim], axes.flip(1)[:, :self.latent_dim]  # (D, Z)
        # an eigenvector's sign is arbitrary: make each axis's largest entry positive (reproducible)
        axes = axes * torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
        self.encoder.weight.copy_(axes.T)
        self.encoder.bias.copy_(-axes.T @ mean)
        self.decoder.linear.weight.copy_(axes)
        self.decoder.linear.bias.copy_(mean)
        self.bottleneck.variance.copy_(variance.clamp(min=0))  # the code variances: eigenvalues


# ---- the registry: one entry declares a contestant


@dataclasses.dataclass(frozen=True)
class Contestant:
    """What a contestant is: its bottleneck and how the model around it is built and trained.

    samples (it has a prior to draw from) and stochastic (its encoder samples a code) are read off
    the bottleneck class, so they cannot disagree with what the model does.
    """

    bottleneck: type                    # a Bottleneck subclass: bottleneck(latent_dim, **weights)
    weights: dict = dataclasses.field(default_factory=dict)   # its loss weights (beta, ...)
    model: type = Autoencoder           # Autoencoder (3 layers), Shallow (1), Stacked (greedy), PCA
    noise_std: float = 0.0              # noise added to the input while training (denoising)
    reference: bool = False             # a reference beside the contestants (pca), not one of them

    @property
    def samples(self):
        return hasattr(self.bottleneck, "prior")

    @property
    def stochastic(self):
        return self.bottleneck.stochastic


CONTESTANTS = {}  # name -> Contestant, in the article's order; register() adds to it


def register(name, bottleneck, **entry):
    """Declare a contestant, e.g. register("mmd", MMD, weights={"beta": 10.0}); see Contestant.

    MODELS, GENERATIVE, VARIATIONAL and REFERENCES are derived here, from the registry alone.
    """
    global MODELS, GENERATIVE, VARIATIONAL, REFERENCES
    CONTESTANTS[name] = Contestant(bottleneck, **entry)
    MODELS = tuple(n for n, c in CONTESTANTS.items() if not c.reference)
    GENERATIVE = tuple(n for n in MODELS if CONTESTANTS[n].samples)
    VARIATIONAL = tuple(n for n in MODELS if CONTESTANTS[n].stochastic)
    REFERENCES = tuple(n for n, c in CONTESTANTS.items() if c.reference)


register("shallow", Identity, model=Shallow)
register("vanilla", Identity)
register("stacked", Identity, model=Stacked)
register("sparse", Sparse, weights={"beta": SPARSITY_BETA})
register("denoising", Identity, noise_std=DENOISING_STD)
register("vae", Variational, weights={"beta": 1.0})
register("beta_vae_strict", Variational, weights={"beta": 2.0})
register("beta_vae_loose", Variational, weights={"beta": 0.5})
register("vq", VectorQuantised, weights={"beta": VQ_BETA})
register("pca", GaussianCode, model=PCA, reference=True)  # fitted in closed form, not trained


def build(name, latent_dim=20, input_dim=INPUT_DIM):
    """A fresh, untrained contestant for images of input_dim pixels. Seed with set_seed first."""
    if name not in CONTESTANTS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(CONTESTANTS)}")
    c = CONTESTANTS[name]
    if not isinstance(latent_dim, int) or latent_dim < 1 or c.bottleneck.h_per_z * latent_dim > input_dim:
        raise ValueError(f"latent_dim must be an integer from 1 to {input_dim // c.bottleneck.h_per_z}, "
                         f"got {latent_dim!r}")
    h_width = c.bottleneck.h_per_z * latent_dim  # H
    # the networks before the bottleneck: the seed's draws keep the order they always had
    encoder, decoder = c.model.networks(latent_dim, h_width, input_dim)
    bottleneck = c.bottleneck(latent_dim, **c.weights)
    return c.model(name, latent_dim, encoder, bottleneck, decoder, c.noise_std)


# ---- training


def fit(model, train_x, val_x, epochs=60, batch_size=256, lr=1e-3, seed=42, device=None, progress=True):
    """Train with Adam on shuffled mini-batches; validation loss after every epoch.

    train_x, val_x: float (N, D) in [0, 1], tensors or arrays, moved once to `device` (default:
    the model's). `progress`: a callable gets {epoch, epochs, stage, train_loss, val_loss,
    samples_per_s, seconds} after each epoch (seconds since fit began); True: print_progress;
    False/None: silent. Returns {"train_loss", "val_loss", "stage": lists, "seconds": total};
    leaves the model in eval mode. A loss that is not finite stops it with a FloatingPointError.
    """
    device, train_x, val_x = _checked_inputs(model, train_x, val_x, epochs, batch_size, device)
    progress = functools.partial(print_progress, name=model.name) if progress is True else progress
    if hasattr(model, "fit_closed_form"):  # pca: one eigendecomposition instead of the loop
        return _fit_closed_form(model, train_x, val_x, batch_size, device, progress)
    n = len(train_x) - (len(train_x) % batch_size == 1)  # BatchNorm cannot train on a batch of one
    set_seed(seed)  # noise of the denoising model and the VAEs
    order_rng = torch.Generator().manual_seed(seed)  # the shuffling order, independent of the noise
    model.to(device)
    schedule = model.stages(epochs)  # [(stage, epochs)]; stacked: 3 stages
    epochs = sum(stage_epochs for _, stage_epochs in schedule)  # stacked trains >= 1 epoch per stage
    history = {"train_loss": [], "val_loss": [], "stage": [], "seconds": 0.0}
    start, epoch = time.perf_counter(), 0
    for stage, stage_epochs in schedule:
        model.set_stage(stage)
        optimizer = _adam(model, lr, device)  # a fresh Adam per stage, on the trainable layers only
        for _ in range(stage_epochs):
            epoch += 1
            model.train()
            epoch_start = time.perf_counter()
            order = torch.randperm(len(train_x), generator=order_rng).to(device)
            loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per batch
            for i in range(0, n, batch_size):
                x = train_x.index_select(0, order[i:i + batch_size])  # (B, D), a copy
                optimizer.zero_grad()
                loss, _ = model.loss(x)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(x)
            train_loss = _finite(loss_sum.item() / n, model, epoch, "training")
            samples_per_s = n / (time.perf_counter() - epoch_start)
            val_loss = _finite(evaluate(model, val_x, batch_size)["loss"], model, epoch, "validation")
            _end_epoch(history, progress, {
                "epoch": epoch, "epochs": epochs, "stage": stage, "train_loss": train_loss,
                "val_loss": val_loss, "samples_per_s": samples_per_s, "seconds": time.perf_counter() - start})
    model.set_stage(None)  # every layer trainable again (stacked)
    model.eval()
    history["seconds"] = time.perf_counter() - start
    return history


def _fit_closed_form(model, train_x, val_x, batch_size, device, progress):
    """fit's history for a model without a loop: one "epoch", its losses and time."""
    start = time.perf_counter()
    model.to(device).fit_closed_form(train_x)
    history = {"train_loss": [], "val_loss": [], "stage": [], "seconds": 0.0}
    _end_epoch(history, progress, {
        "epoch": 1, "epochs": 1, "stage": None, "train_loss": evaluate(model, train_x, batch_size)["loss"],
        "val_loss": evaluate(model, val_x, batch_size)["loss"], "samples_per_s": len(train_x) / max(
            time.perf_counter() - start, 1e-9), "seconds": time.perf_counter() - start})
    model.eval()
    history["seconds"] = time.perf_counter() - start
    return history


def evaluate(model, x, batch_size=256):
    """Mean loss and mean loss parts over x, in eval mode: {"loss": ..., "recon": ..., ...}.

    Under torch.no_grad(), except for a model whose penalty needs d(h)/d(x) (needs_input_grad,
    e.g. a contractive penalty): there autograd stays on, since the penalty is a gradient. The loss
    is only read, never backpropagated, so no parameter's .grad changes either way.
    """
    was_training = model.training
    model.eval()
    sums = {}
    with torch.set_grad_enabled(model.bottleneck.needs_input_grad):
        for i in range(0, len(x), batch_size):
            batch = x[i:i + batch_size]
            loss, parts = model.loss(batch)
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
    model.train(was_training)
    return {key: float(value) / len(x) for key, value in sums.items()}


def print_progress(report, name=""):
    """fit's default progress: one line per epoch, with the time so far and the time left."""
    epoch, epochs, seconds = report["epoch"], report["epochs"], report["seconds"]
    eta = seconds / epoch * (epochs - epoch)  # as fast as the epochs so far
    print(f"{name} epoch {epoch}/{epochs} train {report['train_loss']:.2f} val {report['val_loss']:.2f} "
          f"{report['samples_per_s']:,.0f} samples/s {_clock(seconds)} ETA {_clock(eta)}", flush=True)


# ---- helpers


def set_seed(seed):
    """Seed torch's generators on every device (ae.py draws all its randomness from torch)."""
    torch.manual_seed(seed)


def _checked_inputs(model, train_x, val_x, epochs, batch_size, device):
    """fit's argument checks: (device, train_x, val_x), the pixels as float32 tensors on device."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    train_x, val_x = (_as_pixels(x, what, model.input_dim, device) for x, what in ((train_x, "train_x"), (val_x, "val_x")))
    if not isinstance(epochs, int) or epochs < 1 or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got epochs={epochs!r}, "
                         f"batch_size={batch_size!r}")
    return device, train_x, val_x


def _as_pixels(x, what, input_dim, device):
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != input_dim or len(x) < 2:
        raise ValueError(f"{what} must have shape (N >= 2, {input_dim}), got {tuple(x.shape)}; "
                         f"flatten the zero-padded 32x32 images")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{what} must hold finite pixel values in [0, 1]; divide uint8 images by 255")
    return x.to(device)


def _end_epoch(history, progress, report):
    """Append the epoch's losses and stage to fit's history and show the report."""
    for key in ("train_loss", "val_loss", "stage"):
        history[key].append(report[key])
    if callable(progress):      # False or None: silent
        progress(report)


def _adam(model, lr, device):
    # fused: one pass over the weights per step instead of several (CPU and CUDA have the kernel)
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                            fused=device.type in ("cpu", "cuda"))


def _finite(value, model, epoch, what):
    """value, or a FloatingPointError that says which model diverged, when, and what to try."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{model.name}: {what} loss became {value} in epoch {epoch}; "
                                 f"lower the learning rate or check the input data")
    return value


def _clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"

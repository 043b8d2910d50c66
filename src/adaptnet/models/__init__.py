"""The model zoo: textbook examples and canonical shared/dynamic architectures.

Each model is a plain ``nn.Module`` made by a builder function with flat
keyword arguments; :data:`MODELS` maps names to builders and :func:`build`
checks the arguments. See ``docs/models.md`` for every model's parameter
count with and without sharing.
"""

from adaptnet.models._adaptive import (
    EarlyExitCNN,
    PonderGRU,
    adaptive_depth_mlp,
    early_exit_cnn,
    moe_mlp,
    pondernet_gru,
    sdn_resnet,
)
from adaptnet.models._baselines import cnn1d, gru_classifier, logreg, mlp
from adaptnet.models._decoder import Decoder, DecoderResult, decoder
from adaptnet.models._registry import MODELS, build, describe
from adaptnet.models._shared import (
    LSTMLanguageModel,
    Siamese,
    TiedAutoencoder,
    contrastive_loss,
    lstm_lm,
    siamese,
    tied_autoencoder,
)
from adaptnet.models._textbook import (
    AdaptiveMLP,
    BranchNet,
    SharedScaleNet,
    TwoInputNet,
    adaptive_mlp,
    branch_net,
    reused_layer,
    shared_scale_net,
    small_cnn,
    two_input_net,
)
from adaptnet.models._transformer import (
    SHARING,
    SequenceEncoder,
    albert_encoder,
    universal_transformer,
)
from adaptnet.models._vision import resnet18

__all__ = [
    "MODELS",
    "SHARING",
    "AdaptiveMLP",
    "BranchNet",
    "Decoder",
    "DecoderResult",
    "EarlyExitCNN",
    "LSTMLanguageModel",
    "PonderGRU",
    "SequenceEncoder",
    "SharedScaleNet",
    "Siamese",
    "TiedAutoencoder",
    "TwoInputNet",
    "adaptive_depth_mlp",
    "adaptive_mlp",
    "albert_encoder",
    "branch_net",
    "build",
    "cnn1d",
    "contrastive_loss",
    "decoder",
    "describe",
    "early_exit_cnn",
    "gru_classifier",
    "logreg",
    "lstm_lm",
    "mlp",
    "moe_mlp",
    "pondernet_gru",
    "resnet18",
    "reused_layer",
    "sdn_resnet",
    "shared_scale_net",
    "siamese",
    "small_cnn",
    "tied_autoencoder",
    "two_input_net",
    "universal_transformer",
]

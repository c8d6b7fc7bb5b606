"""Model zoo: small architectures as Python code, for examples, docs and tests.

    from models import mlp, small_cnn, resnet_block_net, build, ZOO
    net = mlp(784, [64, 32], 10)              # an nn.Module in eval mode, random weights
    net, input_shape = build("small_cnn")     # a seeded small instance of a zoo entry
    net, entry = trained("nat_mnist")         # a shipped trained model (models/zoo.json)

``models`` is not part of the installed ``verifier`` package: run from the repository root (or
put it on ``sys.path``) to import it.
"""
from .architectures import (ZOO, ResidualBlock, ResNetBlockNet, build, cnn_cert, mlp, resnet_block_net,
                            siren, small_cnn, vit_tiny)
from .zoo import trained, zoo_entries

__all__ = ["ZOO", "ResNetBlockNet", "ResidualBlock", "build", "cnn_cert", "mlp", "resnet_block_net", "siren", "small_cnn", "trained",
           "vit_tiny", "zoo_entries"]

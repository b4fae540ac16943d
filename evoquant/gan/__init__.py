"""Synthetic images from GANs: train a compact conditional GAN, distill a larger one, load any generator.

Public API::

    from evoquant.gan import train_gan, distill, load_generator
    result = train_gan(x_train, y_train, out_dir="gen/", steps=3000)   # -> TrainResult
    student = distill("stylegan.onnx", out_dir="student/", steps=2000)  # -> TrainResult
    generator = load_generator("gen/")                                 # -> Generator
    images01 = generator.images01(*generator.sample_inputs(16, np.random.default_rng(0)))

The generator directory format and the accepted external generators are described in
:mod:`evoquant.gan.generator`; the model and the training recipe in :mod:`evoquant.gan.models` and
:mod:`evoquant.gan.train`. The ``gan:GEN_DIR`` data source (:mod:`evoquant.data.gan`) draws images from
any of them. torch is needed to train, distill and run TorchScript generators, and is imported only
then; generator directories also hold an OpenVINO IR, which runs without torch.
"""

from evoquant.gan.generator import Generator, GeneratorInfo, load_generator
from evoquant.gan.train import TrainResult, distill, save_sample_grid, train_gan

__all__ = ["train_gan", "distill", "load_generator", "save_sample_grid", "Generator", "GeneratorInfo", "TrainResult"]

"""PLACEHOLDER while the softmax kernels are written: replaced before landing."""


def loss(args):
    raise NotImplementedError("the Triton softmax kernels are being written")

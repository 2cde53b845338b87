"""model.save_pretrained on a model with quantized / pruned layers: refused, with the way out.

transformers writes the state dict it finds (Int8Linear's weight_int8 / weight_scale,
Sparse24Linear's values / metadata) and its from_pretrained later loads that checkpoint into a
float model: every swapped layer's keys are "unexpected", its weight "missing" and randomly
initialised. The result is a different model under a warning table. So patch() puts this
callable on the instance (model.__dict__["save_pretrained"], found before the class method;
push_to_hub and Trainer call it too) and unpatch() takes it off. A plain class with the model as
an attribute, not a bound method: deepcopy and pickle carry it to the copy.
"""
from ..errors import CheckpointFormatError

ATTR = "save_pretrained"


class SaveGuard:
    def __init__(self, model, swapped):
        self.model, self.swapped = model, swapped

    def __call__(self, save_directory=None, *args, **kwargs):
        raise CheckpointFormatError(
            f"{type(self.model).__name__}.save_pretrained: {self.swapped} layers were quantized / pruned by "
            "fastllm.patch; transformers' checkpoint of them would reload with those layers randomly "
            "initialised. Use fastllm.save_pretrained(model, directory) and fastllm.from_pretrained(directory) "
            "(or fastllm.unpatch(model) first, if the originals were kept). Nothing was written.")


def install(model, swapped: int) -> None:
    model.__dict__[ATTR] = SaveGuard(model, swapped)


def remove(model) -> None:
    if isinstance(model.__dict__.get(ATTR), SaveGuard):
        del model.__dict__[ATTR]

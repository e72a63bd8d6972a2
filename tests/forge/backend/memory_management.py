"""Stand-in of Forge Neo's ``backend/memory_management.py``: only ``cast_to_device`` (a copy in the
given dtype on the given device, as ``Tensor.to``)."""


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)

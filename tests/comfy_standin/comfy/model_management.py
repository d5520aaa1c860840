"""Stand-in for comfy/model_management.py (ComfyUI v0.8.0): device, memory and the interrupt flag.

Signatures as in ComfyUI: get_torch_device (line 171), get_total_memory (191), intermediate_device (918),
soft_empty_cache (1538), unload_all_models (1552), InterruptProcessingException and the interrupt
functions (1563-1587). `calls` is stand-in only: what the nodes asked for, in order, for the tests.
"""

import threading

import torch

calls: list[str] = []


def get_torch_device():
    return torch.device("cpu")


def get_total_memory(dev=None, torch_total_too=False):
    return 0


def intermediate_device():
    return torch.device("cpu")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")


def unload_all_models():
    calls.append("unload_all_models")


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()

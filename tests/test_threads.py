import threading

import torch

from nada_core.training.process import training_process
from nada_core.training.threads import for_models, one_thread


def test_tiny_models_train_on_one_thread_and_the_count_comes_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
            seen = []
            t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))   # process-wide
            t.start()
            t.join()
            assert seen == [1]
            with for_models("cpu", tiny=True):       # reference-counted: the inner exit keeps one thread
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        for device, tiny in (("cpu", False), ("cuda", True), ("mps", True)):
            with for_models(device, tiny=tiny):     # real models, and GPUs, keep PyTorch's count
                assert torch.get_num_threads() == 2, (device, tiny)
        with training_process("cpu", tiny=True):    # what every entry point enters
            assert torch.get_num_threads() == 1
        with training_process("cpu", tiny=False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

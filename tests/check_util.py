"""What several test files share: two state dicts equal to float tolerance, and a pickled object
that runs code when an unsafe unpickler loads it."""
import torch


def assert_state_dicts_close(a, b, rtol=1e-5, atol=1e-6):
    """Same keys; floating tensors equal to (rtol, atol), the others exactly."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def _touch(path):  # what an unsafe unpickler would run
    open(path, "w").close()
    return path


class Payload:
    """Unpickled by pickle.load or torch.load(weights_only=False), it creates the file at path."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))

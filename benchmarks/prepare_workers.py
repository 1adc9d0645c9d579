"""Worker processes that run a frozen encoder's host half (`inputs.prepare`), one thread each, as the encode job's
Ray decode tasks run it beside the GPU's forward: `benchmarks/encoder_throughput.py --prepare-processes N`. A
module of its own so that spawned workers import these functions by name."""

inputs = None  # this worker's EncoderInputs


def start(encoder_inputs) -> None:
    import torch  # the log-mel runs on torch: one thread, as a Ray task's OMP_NUM_THREADS=1

    global inputs
    torch.set_num_threads(1)
    inputs = encoder_inputs


def prepare(indexed_item: tuple) -> dict:
    index, item = indexed_item
    return inputs.prepare(item, str(index))

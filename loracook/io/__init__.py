"""The one door to files: checkpoints, adapters and the writer. The rest of loracook sees names, shapes, tensors."""

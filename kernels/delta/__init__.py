"""The gated delta rule (Gated DeltaNet): fp64 reference, chunked PyTorch path, decode step."""

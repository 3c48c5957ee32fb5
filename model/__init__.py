"""Single-process Mixtral in plain PyTorch: config, layers, checkpoints, tokenizer, sampling,
scheduler and the in-process engine. Never imports ray, grpc or protobuf code."""

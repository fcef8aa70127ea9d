"""Files to tensors: the datasets' sources (IDX, CIFAR, image folders), decoding, the image cache, resident
batches and augmentation. Knows nothing of Optuna or MLflow."""

"""Train a 2D UNet on the synthetic data of `csc synth data`, run from the folder
above this one: the repository root, or the folder `csc init` wrote examples/ into.

    .venv/bin/csc train examples/train_2D.py        # or: .venv/bin/python examples/train_2D.py

Every name below is a csc setting; `csc config examples/train_2D.py` prints them all, resolved.
Relative paths are resolved against this file's folder.
"""

# Where the data is: {dataset} and {name} are filled in by the crawler that builds the datasplit.
search_path = "../data/{dataset}/{dataset}.zarr/recon-1/{name}"
datasplit_path = "../datasplit.csv"  # built from search_path on first use if it does not exist

# What to segment, in the order of the model's output channels.
classes = ["nuc", "mito", "er"]

# Patches: (z, y, x) voxels and nm per voxel. A singleton z makes this a 2D model's input.
input_array_info = {"shape": (1, 128, 128), "scale": (8, 8, 8)}
target_array_info = input_array_info  # predict at the input's resolution

# Model: a name from csc's registry, with its keyword arguments (docs/models.md). A small UNet
# (16 channels at the top, 3 poolings) trains in minutes on a CPU.
model_name = "2d_unet"
model_kwargs = {"base_channels": 16, "num_levels": 3}

# Loss: soft Dice plus BCE, unweighted (weight_loss would weigh rare classes up).
criterion = "dice_bce"
weight_loss = False

# Optimisation: an epoch is exactly `iterations_per_epoch` batches of `batch_size` patches.
epochs = 8
iterations_per_epoch = 50
batch_size = 8
learning_rate = 3e-3
random_seed = 42  # same seed, same patches, same results (docs/training.md)

# Validation: at most this many batches per epoch, the same tiles every epoch.
validation_batch_limit = 8
# What "best" means for the best checkpoint, early stopping and load_model = "best": the mean
# validation loss ("loss"), or a metric such as "iou" (mean over classes) or "iou/nuc".
monitor = "loss"
# More options, with their defaults (docs/configuration.md):
# optimizer_kwargs = {"weight_decay": 1e-4}  # RAdam's own arguments (betas, eps, ...)
# warmup_steps = 0          # optimizer steps of linear warm-up before the scheduler
# log_every_n_steps = 1     # per-batch TensorBoard scalars every N batches
# tensorboard_images = 3    # validation examples and training patches shown per epoch
# deterministic = False     # deterministic algorithms (slower; docs/training.md)

# Where results go: {model_name} and {epoch} are filled in. A second run resumes from the
# latest checkpoint and trains `epochs` more epochs (load_model = None starts afresh).
model_save_path = "../checkpoints/{model_name}_{epoch}.pth"
logs_save_path = "../tensorboard/{model_name}"
predictions_path = "../predictions/{model_name}"  # csc predict writes here
processed_path = "../predictions/{model_name}_processed"  # csc process writes here
load_model = "latest"

if __name__ == "__main__":
    from csc import train

    train(__file__)

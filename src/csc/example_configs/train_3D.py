"""Train a 3D UNet on the synthetic data of `csc synth data`, run from the folder
above this one: the repository root, or the folder `csc init` wrote examples/ into.

    .venv/bin/csc train examples/train_3D.py        # or: .venv/bin/python examples/train_3D.py

Every name below is a csc setting; `csc config examples/train_3D.py` prints them all, resolved.
Relative paths are resolved against this file's folder.
"""

# Where the data is: {dataset} and {name} are filled in by the crawler that builds the datasplit.
search_path = "../data/{dataset}/{dataset}.zarr/recon-1/{name}"
datasplit_path = "../datasplit.csv"  # built from search_path on first use if it does not exist

# What to segment, in the order of the model's output channels.
classes = ["nuc", "mito", "er"]

# Patches: (z, y, x) voxels and nm per voxel; 3 UNet poolings need sizes divisible by 8.
input_array_info = {"shape": (32, 64, 64), "scale": (8, 8, 8)}
target_array_info = input_array_info  # predict at the input's resolution

# Augmentation: flips, swapping x and y, and rotation about z (docs/data.md).
spatial_transforms = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.5}},  # probability of flipping each axis
    "transpose": {"axes": ["x", "y"]},  # axes that may be swapped
    "rotate": {"axes": {"z": [-180, 180]}},  # degrees, drawn uniformly
}

# Model: a name from csc's registry, with its keyword arguments (docs/models.md).
model_name = "3d_unet"
model_kwargs = {"num_levels": 3}

# Optimisation: an epoch is exactly `iterations_per_epoch` batches of `batch_size` patches.
epochs = 10
iterations_per_epoch = 50
batch_size = 2
learning_rate = 1e-3
optimizer = "adamw"
scheduler = "cosine"  # over the run's optimizer steps
random_seed = 42  # same seed, same patches, same results (docs/training.md)

# Validation: each epoch for at most this many seconds (at least one batch).
validation_time_limit = 20

# Where results go: {model_name} and {epoch} are filled in. A second run resumes from the
# latest checkpoint and trains `epochs` more epochs (load_model = None starts afresh).
model_save_path = "../checkpoints/{model_name}_{epoch}.pth"
logs_save_path = "../tensorboard/{model_name}"
predictions_path = "../predictions/{model_name}"  # csc predict writes here
processed_path = "../predictions/{model_name}_processed"  # csc process writes here
load_model = "latest"
keep_last_checkpoints = 3  # older epochs are deleted, never the best

if __name__ == "__main__":
    from csc import train

    train(__file__)

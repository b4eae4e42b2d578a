"""Image data: ImageFolder directories, Fashion-MNIST IDX files, the bundled subsets."""

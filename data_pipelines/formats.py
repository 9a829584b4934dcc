"""What `harness data convert KIND SRC DEST` expects as SRC, per kind (a light module: the CLI's help imports it)."""

# What SRC must be, per kind (error messages and `harness data convert --help`).
SOURCES = {
    "digits": "-  (scikit-learn ships the digits)",
    "mnist1d": "-  (the mnist1d package generates MNIST-1D offline)",
    "cifar10": "cifar-10-python.tar.gz, or its extracted folder cifar-10-batches-py/ "
               "(https://www.cs.toronto.edu/~kriz/cifar.html)",
    "cifar100": "cifar-100-python.tar.gz, or its extracted folder cifar-100-python/ "
                "(https://www.cs.toronto.edu/~kriz/cifar.html)",
    "mnist": "a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz (gzipped or not)",
    "ptb": "a folder holding ptb.train.txt, ptb.valid.txt, ptb.test.txt (simple-examples/data of "
           "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz)",
    "imagenet": "an ILSVRC2012 folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
                "(or val/*.JPEG with --val-labels FILE)",
}
DEFAULT_SHARD_SIZE = {"digits": 1000, "mnist1d": 1000, "cifar10": 10000, "cifar100": 10000, "mnist": 10000, "ptb": 10}

# The SRC a user passes to `harness data convert KIND SRC DIR`, as it is usually named.
CONVERT_SRC = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz", "mnist": "MNIST_DIR",
               "ptb": "PTB_DIR", "imagenet": "ILSVRC2012_DIR"}

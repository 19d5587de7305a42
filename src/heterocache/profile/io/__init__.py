"""Finding profile files: bundled with the package, in folders, on the Hugging Face Hub."""

from pipeline.cli import main

# Guarded: the image decoder's worker processes (spawned) import this module too.
if __name__ == "__main__":
    raise SystemExit(main())

from datapipe.shards.cli import main

main()

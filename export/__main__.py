from export.weights import main

main()

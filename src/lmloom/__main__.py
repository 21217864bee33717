from lmloom.cli import main

main()

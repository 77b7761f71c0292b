from quantselect.cli import main

main()

from memsvc.cli import main

main()

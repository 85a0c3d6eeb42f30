from batchq._entry import main

main()

# USER_C_MODULES=sim (pilehost/chipmodel.py builds the chip-model binary with it).
CHIPMARK_DIR := $(USERMOD_DIR)
SRC_USERMOD_C += $(CHIPMARK_DIR)/chipmark.c

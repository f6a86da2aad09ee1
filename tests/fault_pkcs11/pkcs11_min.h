/*
 * Minimal PKCS#11 v2.40 declarations for fault_pkcs11.c (test support only).
 *
 * Written from the PKCS#11 v2.40 base specification's layout: CK_ULONG is
 * unsigned long, structures use the platform's natural packing (Linux), and
 * CK_FUNCTION_LIST is a CK_VERSION followed by the 68 function pointers in
 * the standard order.  Only what the wrapper needs is declared.
 *
 * For every function there are two macros: P_<name> is its parameter list and
 * A_<name> the matching argument list, so that forwarders can be generated.
 * Every function taking a session names that parameter hSession.
 */
#ifndef FAULT_PKCS11_MIN_H
#define FAULT_PKCS11_MIN_H

typedef unsigned char CK_BYTE;
typedef CK_BYTE CK_CHAR;
typedef CK_BYTE CK_UTF8CHAR;
typedef CK_BYTE CK_BBOOL;
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_FLAGS;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_ULONG CK_USER_TYPE;
typedef CK_ULONG CK_STATE;
typedef CK_ULONG CK_MECHANISM_TYPE;
typedef CK_ULONG CK_ATTRIBUTE_TYPE;
typedef CK_ULONG CK_NOTIFICATION;

#define CK_TRUE 1
#define CK_FALSE 0

typedef struct CK_VERSION { CK_BYTE major; CK_BYTE minor; } CK_VERSION;

typedef struct CK_INFO {
    CK_VERSION cryptokiVersion;
    CK_UTF8CHAR manufacturerID[32];
    CK_FLAGS flags;
    CK_UTF8CHAR libraryDescription[32];
    CK_VERSION libraryVersion;
} CK_INFO;

typedef struct CK_SLOT_INFO {
    CK_UTF8CHAR slotDescription[64];
    CK_UTF8CHAR manufacturerID[32];
    CK_FLAGS flags;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
} CK_SLOT_INFO;

typedef struct CK_TOKEN_INFO {
    CK_UTF8CHAR label[32];
    CK_UTF8CHAR manufacturerID[32];
    CK_UTF8CHAR model[16];
    CK_CHAR serialNumber[16];
    CK_FLAGS flags;
    CK_ULONG ulMaxSessionCount;
    CK_ULONG ulSessionCount;
    CK_ULONG ulMaxRwSessionCount;
    CK_ULONG ulRwSessionCount;
    CK_ULONG ulMaxPinLen;
    CK_ULONG ulMinPinLen;
    CK_ULONG ulTotalPublicMemory;
    CK_ULONG ulFreePublicMemory;
    CK_ULONG ulTotalPrivateMemory;
    CK_ULONG ulFreePrivateMemory;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
    CK_CHAR utcTime[16];
} CK_TOKEN_INFO;

typedef struct CK_SESSION_INFO {
    CK_SLOT_ID slotID;
    CK_STATE state;
    CK_FLAGS flags;
    CK_ULONG ulDeviceError;
} CK_SESSION_INFO;

typedef struct CK_MECHANISM {
    CK_MECHANISM_TYPE mechanism;
    void *pParameter;
    CK_ULONG ulParameterLen;
} CK_MECHANISM;

typedef struct CK_MECHANISM_INFO {
    CK_ULONG ulMinKeySize;
    CK_ULONG ulMaxKeySize;
    CK_FLAGS flags;
} CK_MECHANISM_INFO;

typedef struct CK_ATTRIBUTE {
    CK_ATTRIBUTE_TYPE type;
    void *pValue;
    CK_ULONG ulValueLen;
} CK_ATTRIBUTE;

typedef CK_RV (*CK_NOTIFY)(CK_SESSION_HANDLE hSession, CK_NOTIFICATION event, void *pApplication);

struct CK_FUNCTION_LIST;
typedef struct CK_FUNCTION_LIST CK_FUNCTION_LIST;

/* flags */
#define CKF_TOKEN_PRESENT                 0x00000001UL
#define CKF_REMOVABLE_DEVICE              0x00000002UL
#define CKF_HW_SLOT                       0x00000004UL
#define CKF_PROTECTED_AUTHENTICATION_PATH 0x00000100UL
#define CKF_USER_PIN_COUNT_LOW            0x00010000UL
#define CKF_USER_PIN_FINAL_TRY            0x00020000UL
#define CKF_USER_PIN_LOCKED               0x00040000UL
#define CKF_DONT_BLOCK                    0x00000001UL

#define CKU_SO               0UL
#define CKU_USER             1UL
#define CKU_CONTEXT_SPECIFIC 2UL

/* return values */
#define CKR_OK                        0x000UL
#define CKR_CANCEL                    0x001UL
#define CKR_HOST_MEMORY               0x002UL
#define CKR_SLOT_ID_INVALID           0x003UL
#define CKR_GENERAL_ERROR             0x005UL
#define CKR_FUNCTION_FAILED           0x006UL
#define CKR_ARGUMENTS_BAD             0x007UL
#define CKR_NO_EVENT                  0x008UL
#define CKR_DATA_LEN_RANGE            0x021UL
#define CKR_DEVICE_ERROR              0x030UL
#define CKR_DEVICE_MEMORY             0x031UL
#define CKR_DEVICE_REMOVED            0x032UL
#define CKR_FUNCTION_CANCELED         0x050UL
#define CKR_FUNCTION_NOT_SUPPORTED    0x054UL
#define CKR_KEY_HANDLE_INVALID        0x060UL
#define CKR_MECHANISM_INVALID         0x070UL
#define CKR_OBJECT_HANDLE_INVALID     0x082UL
#define CKR_OPERATION_ACTIVE          0x090UL
#define CKR_OPERATION_NOT_INITIALIZED 0x091UL
#define CKR_PIN_INCORRECT             0x0A0UL
#define CKR_PIN_EXPIRED               0x0A3UL
#define CKR_PIN_LOCKED                0x0A4UL
#define CKR_SESSION_CLOSED            0x0B0UL
#define CKR_SESSION_HANDLE_INVALID    0x0B3UL
#define CKR_TOKEN_NOT_PRESENT         0x0E0UL
#define CKR_TOKEN_NOT_RECOGNIZED      0x0E1UL
#define CKR_USER_ALREADY_LOGGED_IN    0x100UL
#define CKR_USER_NOT_LOGGED_IN        0x101UL
#define CKR_BUFFER_TOO_SMALL          0x150UL
#define CKR_CRYPTOKI_NOT_INITIALIZED  0x190UL
#define CKR_FUNCTION_REJECTED         0x200UL

/* parameter lists (P_) and argument lists (A_) */
#define P_C_Initialize (void *pInitArgs)
#define A_C_Initialize (pInitArgs)
#define P_C_Finalize (void *pReserved)
#define A_C_Finalize (pReserved)
#define P_C_GetInfo (CK_INFO *pInfo)
#define A_C_GetInfo (pInfo)
#define P_C_GetFunctionList (CK_FUNCTION_LIST **ppFunctionList)
#define A_C_GetFunctionList (ppFunctionList)
#define P_C_GetSlotList (CK_BBOOL tokenPresent, CK_SLOT_ID *pSlotList, CK_ULONG *pulCount)
#define A_C_GetSlotList (tokenPresent, pSlotList, pulCount)
#define P_C_GetSlotInfo (CK_SLOT_ID slotID, CK_SLOT_INFO *pInfo)
#define A_C_GetSlotInfo (slotID, pInfo)
#define P_C_GetTokenInfo (CK_SLOT_ID slotID, CK_TOKEN_INFO *pInfo)
#define A_C_GetTokenInfo (slotID, pInfo)
#define P_C_GetMechanismList (CK_SLOT_ID slotID, CK_MECHANISM_TYPE *pMechanismList, CK_ULONG *pulCount)
#define A_C_GetMechanismList (slotID, pMechanismList, pulCount)
#define P_C_GetMechanismInfo (CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO *pInfo)
#define A_C_GetMechanismInfo (slotID, type, pInfo)
#define P_C_InitToken (CK_SLOT_ID slotID, CK_UTF8CHAR *pPin, CK_ULONG ulPinLen, CK_UTF8CHAR *pLabel)
#define A_C_InitToken (slotID, pPin, ulPinLen, pLabel)
#define P_C_InitPIN (CK_SESSION_HANDLE hSession, CK_UTF8CHAR *pPin, CK_ULONG ulPinLen)
#define A_C_InitPIN (hSession, pPin, ulPinLen)
#define P_C_SetPIN (CK_SESSION_HANDLE hSession, CK_UTF8CHAR *pOldPin, CK_ULONG ulOldLen, CK_UTF8CHAR *pNewPin, CK_ULONG ulNewLen)
#define A_C_SetPIN (hSession, pOldPin, ulOldLen, pNewPin, ulNewLen)
#define P_C_OpenSession (CK_SLOT_ID slotID, CK_FLAGS flags, void *pApplication, CK_NOTIFY Notify, CK_SESSION_HANDLE *phSession)
#define A_C_OpenSession (slotID, flags, pApplication, Notify, phSession)
#define P_C_CloseSession (CK_SESSION_HANDLE hSession)
#define A_C_CloseSession (hSession)
#define P_C_CloseAllSessions (CK_SLOT_ID slotID)
#define A_C_CloseAllSessions (slotID)
#define P_C_GetSessionInfo (CK_SESSION_HANDLE hSession, CK_SESSION_INFO *pInfo)
#define A_C_GetSessionInfo (hSession, pInfo)
#define P_C_GetOperationState (CK_SESSION_HANDLE hSession, CK_BYTE *pOperationState, CK_ULONG *pulOperationStateLen)
#define A_C_GetOperationState (hSession, pOperationState, pulOperationStateLen)
#define P_C_SetOperationState (CK_SESSION_HANDLE hSession, CK_BYTE *pOperationState, CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE hEncryptionKey, CK_OBJECT_HANDLE hAuthenticationKey)
#define A_C_SetOperationState (hSession, pOperationState, ulOperationStateLen, hEncryptionKey, hAuthenticationKey)
#define P_C_Login (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR *pPin, CK_ULONG ulPinLen)
#define A_C_Login (hSession, userType, pPin, ulPinLen)
#define P_C_Logout (CK_SESSION_HANDLE hSession)
#define A_C_Logout (hSession)
#define P_C_CreateObject (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE *phObject)
#define A_C_CreateObject (hSession, pTemplate, ulCount, phObject)
#define P_C_CopyObject (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE *phNewObject)
#define A_C_CopyObject (hSession, hObject, pTemplate, ulCount, phNewObject)
#define P_C_DestroyObject (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject)
#define A_C_DestroyObject (hSession, hObject)
#define P_C_GetObjectSize (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ULONG *pulSize)
#define A_C_GetObjectSize (hSession, hObject, pulSize)
#define P_C_GetAttributeValue (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount)
#define A_C_GetAttributeValue (hSession, hObject, pTemplate, ulCount)
#define P_C_SetAttributeValue (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount)
#define A_C_SetAttributeValue (hSession, hObject, pTemplate, ulCount)
#define P_C_FindObjectsInit (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount)
#define A_C_FindObjectsInit (hSession, pTemplate, ulCount)
#define P_C_FindObjects (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE *phObject, CK_ULONG ulMaxObjectCount, CK_ULONG *pulObjectCount)
#define A_C_FindObjects (hSession, phObject, ulMaxObjectCount, pulObjectCount)
#define P_C_FindObjectsFinal (CK_SESSION_HANDLE hSession)
#define A_C_FindObjectsFinal (hSession)
#define P_C_EncryptInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey)
#define A_C_EncryptInit (hSession, pMechanism, hKey)
#define P_C_Encrypt (CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, CK_BYTE *pEncryptedData, CK_ULONG *pulEncryptedDataLen)
#define A_C_Encrypt (hSession, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen)
#define P_C_EncryptUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen, CK_BYTE *pEncryptedPart, CK_ULONG *pulEncryptedPartLen)
#define A_C_EncryptUpdate (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen)
#define P_C_EncryptFinal (CK_SESSION_HANDLE hSession, CK_BYTE *pLastEncryptedPart, CK_ULONG *pulLastEncryptedPartLen)
#define A_C_EncryptFinal (hSession, pLastEncryptedPart, pulLastEncryptedPartLen)
#define P_C_DecryptInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey)
#define A_C_DecryptInit (hSession, pMechanism, hKey)
#define P_C_Decrypt (CK_SESSION_HANDLE hSession, CK_BYTE *pEncryptedData, CK_ULONG ulEncryptedDataLen, CK_BYTE *pData, CK_ULONG *pulDataLen)
#define A_C_Decrypt (hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen)
#define P_C_DecryptUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pEncryptedPart, CK_ULONG ulEncryptedPartLen, CK_BYTE *pPart, CK_ULONG *pulPartLen)
#define A_C_DecryptUpdate (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen)
#define P_C_DecryptFinal (CK_SESSION_HANDLE hSession, CK_BYTE *pLastPart, CK_ULONG *pulLastPartLen)
#define A_C_DecryptFinal (hSession, pLastPart, pulLastPartLen)
#define P_C_DigestInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism)
#define A_C_DigestInit (hSession, pMechanism)
#define P_C_Digest (CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, CK_BYTE *pDigest, CK_ULONG *pulDigestLen)
#define A_C_Digest (hSession, pData, ulDataLen, pDigest, pulDigestLen)
#define P_C_DigestUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen)
#define A_C_DigestUpdate (hSession, pPart, ulPartLen)
#define P_C_DigestKey (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey)
#define A_C_DigestKey (hSession, hKey)
#define P_C_DigestFinal (CK_SESSION_HANDLE hSession, CK_BYTE *pDigest, CK_ULONG *pulDigestLen)
#define A_C_DigestFinal (hSession, pDigest, pulDigestLen)
#define P_C_SignInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey)
#define A_C_SignInit (hSession, pMechanism, hKey)
#define P_C_Sign (CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, CK_BYTE *pSignature, CK_ULONG *pulSignatureLen)
#define A_C_Sign (hSession, pData, ulDataLen, pSignature, pulSignatureLen)
#define P_C_SignUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen)
#define A_C_SignUpdate (hSession, pPart, ulPartLen)
#define P_C_SignFinal (CK_SESSION_HANDLE hSession, CK_BYTE *pSignature, CK_ULONG *pulSignatureLen)
#define A_C_SignFinal (hSession, pSignature, pulSignatureLen)
#define P_C_SignRecoverInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey)
#define A_C_SignRecoverInit (hSession, pMechanism, hKey)
#define P_C_SignRecover (CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, CK_BYTE *pSignature, CK_ULONG *pulSignatureLen)
#define A_C_SignRecover (hSession, pData, ulDataLen, pSignature, pulSignatureLen)
#define P_C_VerifyInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey)
#define A_C_VerifyInit (hSession, pMechanism, hKey)
#define P_C_Verify (CK_SESSION_HANDLE hSession, CK_BYTE *pData, CK_ULONG ulDataLen, CK_BYTE *pSignature, CK_ULONG ulSignatureLen)
#define A_C_Verify (hSession, pData, ulDataLen, pSignature, ulSignatureLen)
#define P_C_VerifyUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen)
#define A_C_VerifyUpdate (hSession, pPart, ulPartLen)
#define P_C_VerifyFinal (CK_SESSION_HANDLE hSession, CK_BYTE *pSignature, CK_ULONG ulSignatureLen)
#define A_C_VerifyFinal (hSession, pSignature, ulSignatureLen)
#define P_C_VerifyRecoverInit (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hKey)
#define A_C_VerifyRecoverInit (hSession, pMechanism, hKey)
#define P_C_VerifyRecover (CK_SESSION_HANDLE hSession, CK_BYTE *pSignature, CK_ULONG ulSignatureLen, CK_BYTE *pData, CK_ULONG *pulDataLen)
#define A_C_VerifyRecover (hSession, pSignature, ulSignatureLen, pData, pulDataLen)
#define P_C_DigestEncryptUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen, CK_BYTE *pEncryptedPart, CK_ULONG *pulEncryptedPartLen)
#define A_C_DigestEncryptUpdate (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen)
#define P_C_DecryptDigestUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pEncryptedPart, CK_ULONG ulEncryptedPartLen, CK_BYTE *pPart, CK_ULONG *pulPartLen)
#define A_C_DecryptDigestUpdate (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen)
#define P_C_SignEncryptUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pPart, CK_ULONG ulPartLen, CK_BYTE *pEncryptedPart, CK_ULONG *pulEncryptedPartLen)
#define A_C_SignEncryptUpdate (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen)
#define P_C_DecryptVerifyUpdate (CK_SESSION_HANDLE hSession, CK_BYTE *pEncryptedPart, CK_ULONG ulEncryptedPartLen, CK_BYTE *pPart, CK_ULONG *pulPartLen)
#define A_C_DecryptVerifyUpdate (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen)
#define P_C_GenerateKey (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_ATTRIBUTE *pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE *phKey)
#define A_C_GenerateKey (hSession, pMechanism, pTemplate, ulCount, phKey)
#define P_C_GenerateKeyPair (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_ATTRIBUTE *pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount, CK_ATTRIBUTE *pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount, CK_OBJECT_HANDLE *phPublicKey, CK_OBJECT_HANDLE *phPrivateKey)
#define A_C_GenerateKeyPair (hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount, pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey)
#define P_C_WrapKey (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey, CK_BYTE *pWrappedKey, CK_ULONG *pulWrappedKeyLen)
#define A_C_WrapKey (hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen)
#define P_C_UnwrapKey (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE *pWrappedKey, CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE *pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE *phKey)
#define A_C_UnwrapKey (hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen, pTemplate, ulAttributeCount, phKey)
#define P_C_DeriveKey (CK_SESSION_HANDLE hSession, CK_MECHANISM *pMechanism, CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE *pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE *phKey)
#define A_C_DeriveKey (hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey)
#define P_C_SeedRandom (CK_SESSION_HANDLE hSession, CK_BYTE *pSeed, CK_ULONG ulSeedLen)
#define A_C_SeedRandom (hSession, pSeed, ulSeedLen)
#define P_C_GenerateRandom (CK_SESSION_HANDLE hSession, CK_BYTE *RandomData, CK_ULONG ulRandomLen)
#define A_C_GenerateRandom (hSession, RandomData, ulRandomLen)
#define P_C_GetFunctionStatus (CK_SESSION_HANDLE hSession)
#define A_C_GetFunctionStatus (hSession)
#define P_C_CancelFunction (CK_SESSION_HANDLE hSession)
#define A_C_CancelFunction (hSession)
#define P_C_WaitForSlotEvent (CK_FLAGS flags, CK_SLOT_ID *pSlot, void *pReserved)
#define A_C_WaitForSlotEvent (flags, pSlot, pReserved)

/* The 68 functions of CK_FUNCTION_LIST, in the standard v2.40 order. */
#define CK_ALL_FUNCTIONS(X) \
    X(C_Initialize) X(C_Finalize) X(C_GetInfo) X(C_GetFunctionList) \
    X(C_GetSlotList) X(C_GetSlotInfo) X(C_GetTokenInfo) X(C_GetMechanismList) \
    X(C_GetMechanismInfo) X(C_InitToken) X(C_InitPIN) X(C_SetPIN) \
    X(C_OpenSession) X(C_CloseSession) X(C_CloseAllSessions) X(C_GetSessionInfo) \
    X(C_GetOperationState) X(C_SetOperationState) X(C_Login) X(C_Logout) \
    X(C_CreateObject) X(C_CopyObject) X(C_DestroyObject) X(C_GetObjectSize) \
    X(C_GetAttributeValue) X(C_SetAttributeValue) X(C_FindObjectsInit) X(C_FindObjects) \
    X(C_FindObjectsFinal) X(C_EncryptInit) X(C_Encrypt) X(C_EncryptUpdate) \
    X(C_EncryptFinal) X(C_DecryptInit) X(C_Decrypt) X(C_DecryptUpdate) \
    X(C_DecryptFinal) X(C_DigestInit) X(C_Digest) X(C_DigestUpdate) \
    X(C_DigestKey) X(C_DigestFinal) X(C_SignInit) X(C_Sign) \
    X(C_SignUpdate) X(C_SignFinal) X(C_SignRecoverInit) X(C_SignRecover) \
    X(C_VerifyInit) X(C_Verify) X(C_VerifyUpdate) X(C_VerifyFinal) \
    X(C_VerifyRecoverInit) X(C_VerifyRecover) X(C_DigestEncryptUpdate) X(C_DecryptDigestUpdate) \
    X(C_SignEncryptUpdate) X(C_DecryptVerifyUpdate) X(C_GenerateKey) X(C_GenerateKeyPair) \
    X(C_WrapKey) X(C_UnwrapKey) X(C_DeriveKey) X(C_SeedRandom) \
    X(C_GenerateRandom) X(C_GetFunctionStatus) X(C_CancelFunction) X(C_WaitForSlotEvent)

#define CK_FIELD_(name) CK_RV (*name) P_##name;
struct CK_FUNCTION_LIST {
    CK_VERSION version;
    CK_ALL_FUNCTIONS(CK_FIELD_)
};
#undef CK_FIELD_

#endif

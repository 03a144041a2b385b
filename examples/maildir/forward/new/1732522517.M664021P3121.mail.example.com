Return-Path: <bob@example.com>
Delivered-To: mailroute-forward@example.com
Received: from EX01.corp.example.com (10.20.0.11) by EX02.corp.example.com
 (10.20.0.12) with Microsoft SMTP Server (version=TLS1_2,
 cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.2.1544.4; Mon, 25 Nov 2024 08:15:17 +0000
From: Bob Okafor <bob@example.com>
To: "mailroute-forward@example.com" <mailroute-forward@example.com>
Subject: FW: Delivery schedule for order 4471
Thread-Topic: Delivery schedule for order 4471
Date: Mon, 25 Nov 2024 08:15:17 +0000
Message-ID: <DB9PR10MB5731C9D41B27E6A0F5D83C14B7E90@DB9PR10MB5731.corp.example.com>
Accept-Language: en-US
Content-Language: en-US
X-MS-Has-Attach: yes
X-MS-Exchange-Organization-AutoForwarded: true
X-MS-Exchange-Inbox-Rules-Loop: bob@example.com
Content-Type: multipart/mixed; boundary="_002_DB9PR10MB5731C9D41B27E6A0F5D83C14B7E90_"
MIME-Version: 1.0

--_002_DB9PR10MB5731C9D41B27E6A0F5D83C14B7E90_
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: 7bit

This message was forwarded by a rule in Bob Okafor's mailbox.

--_002_DB9PR10MB5731C9D41B27E6A0F5D83C14B7E90_
Content-Type: message/rfc822
Content-Disposition: attachment;
	creation-date="Mon, 25 Nov 2024 08:15:17 GMT";
	modification-date="Mon, 25 Nov 2024 08:15:17 GMT"

Return-Path: <dave.fischer@supplier.example>
Delivered-To: bob@example.com
Received: from mx1.supplier.example (mx1.supplier.example [192.0.2.25])
	by mail.example.com with ESMTPS id 4Xy7Qk2Vd1z9sWn
	for <bob@example.com>; Mon, 25 Nov 2024 08:15:14 +0000
From: Dave Fischer <dave.fischer@supplier.example>
To: Alice Martin <alice@example.com>
Cc: Bob Okafor <bob@example.com>
Subject: Delivery schedule for order 4471
Date: Mon, 25 Nov 2024 09:15:12 +0100
Message-ID: <20241125081512.4471.dfischer@supplier.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Hello Alice,

As promised on the phone, here is the delivery schedule for order 4471
(48 units of the DX-200 controller):

  - 20 units ship on Wednesday 27 November, arriving Friday 29 November
  - 28 units ship on Tuesday 3 December, arriving Thursday 5 December

The second batch waits for the revised firmware (v2.4.1). If you would
rather receive all 48 units together on 5 December, let me know by
Tuesday noon and I will hold the first batch.

I have copied Bob, since his team does the installation.

Best regards,
Dave Fischer
Account Manager, Fischer Components GmbH
+49 30 555 0142

--_002_DB9PR10MB5731C9D41B27E6A0F5D83C14B7E90_--
